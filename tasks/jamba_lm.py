"""Jamba language-model training as a task of the shared loop.

Loss per target token: next-token cross-entropy (float32) + router_aux_loss_coef x the Switch
load-balancing loss + activation_loss_coef x the mean over layers of the mean square of each
decoder block's output (Jamba-1.5's activation loss, which keeps activations small enough for
16-bit inference; 0 in the tiny default).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from common.tokenizers import load_tokenizer
from jamba_jax import JambaConfig, JambaForCausalLM, format_param_table, generate, init_params
from jamba_jax.losses import target_weights
from jamba_jax.params import activation_bytes, param_logical_specs
from training.data import lm_dataset, text_source
from training.task import Task


class JambaLMTask(Task):
    name = "jamba_lm"

    def __init__(self, config):
        self.config = config
        self.cfg = JambaConfig.from_dict(config.model.to_dict())
        self.model = JambaForCausalLM(self.cfg)
        self.tokenizer = None if config.dry_run else load_tokenizer(config.data.tokenizer, self.cfg.vocab_size)
        print(format_param_table(self.cfg))

    def meta(self) -> dict:
        return {"task": self.name, "model": dataclasses.asdict(self.cfg)}

    def init_params(self, rng):
        return init_params(self.cfg, rng)

    def param_specs(self, params):
        return param_logical_specs(self.cfg)

    def activation_bytes(self, rows: int, seq_len: int) -> int:
        return activation_bytes(self.cfg, rows, seq_len)

    def dataset(self, split, train, process_index, process_count):
        c = self.config
        return lm_dataset(text_source(c.data, split), self.tokenizer, batch_size=c.batch_size, seq_len=c.seq_len,
                          seed=c.seed, train=train, process_index=process_index, process_count=process_count)

    def sums(self, params, batch, rng, frozen):
        """Next-token NLL of the real same-document targets (the model's chunked `token_nll`: no logits array),
        the load-balancing loss and, when its coefficient is set, the activation loss, each per target."""
        del rng  # no dropout in Jamba
        inputs, segments = batch["inputs"], batch["segment_ids"]
        act_coef = self.config.activation_loss_coef
        args = (inputs, jnp.pad(inputs[:, 1:], [(0, 0), (0, 1)]), None, segments)
        if act_coef > 0:
            out, state = self.model.apply({"params": params}, *args, method="token_nll", mutable=["intermediates"])
            act = jnp.mean(jnp.stack(jax.tree.leaves(state["intermediates"])))
        else:
            out, act = self.model.apply({"params": params}, *args, method="token_nll"), jnp.zeros((), jnp.float32)
        w = target_weights(inputs, None, segments)
        nll, tokens = jnp.sum(out.token_nll[:, :-1] * w), jnp.sum(w)
        sums = {"loss": nll, "tokens": tokens, "aux_loss": tokens * out.aux_loss,
                "objective": nll + tokens * (self.cfg.router_aux_loss_coef * out.aux_loss + act_coef * act)}
        return {**sums, "activation_loss": tokens * act} if act_coef > 0 else sums

    def on_end(self, params, frozen):
        prompt, n = self.config.sample_prompt, self.config.sample_tokens
        if not prompt or n <= 0:
            return
        ids = np.asarray([[self.tokenizer.bos_id] + self.tokenizer.encode(prompt)], np.int32)
        new = generate(self.model, params, ids, max_new_tokens=n, eos_token_id=self.tokenizer.eos_id,
                       pad_token_id=self.tokenizer.pad_id)[0]
        print(f"greedy sample: {prompt!r} -> {self.tokenizer.decode(new[new != self.tokenizer.pad_id])!r}")


Task = JambaLMTask
