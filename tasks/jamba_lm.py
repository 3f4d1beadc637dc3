"""Jamba language-model pretraining / fine-tuning as a task of the shared training loop.

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

from jamba_jax import JambaConfig, JambaForCausalLM, format_param_table, generate, init_params
from jamba_jax.losses import target_weights
from jamba_jax.params import activation_bytes, param_logical_specs
from training.data import lm_dataset, load_tokenizer, text_source


class JambaLMTask:
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

    def param_specs(self):
        return param_logical_specs(self.cfg)

    def activation_bytes(self, rows: int, seq_len: int) -> int:
        return activation_bytes(self.cfg, rows, seq_len)

    # --- data ------------------------------------------------------------------------------------
    def _dataset(self, split, train, pidx=0, pcount=1):
        c = self.config
        return lm_dataset(text_source(c.data, split), self.tokenizer, batch_size=c.batch_size,
                          seq_len=c.seq_len, seed=c.seed, train=train, process_index=pidx, process_count=pcount)

    def train_dataset(self, process_index, process_count):
        return self._dataset("train", True, process_index, process_count)

    def eval_dataset(self, process_index, process_count):
        return self._dataset("validation", False, process_index, process_count)

    # --- loss --------------------------------------------------------------------------------------
    def _forward(self, params, batch, with_activations):
        """(output with token_nll of each next token (no logits array: `JambaForCausalLM` targets), activation loss)."""
        inputs, segments = batch["inputs"], batch["segment_ids"]
        kw = dict(segment_ids=segments, targets=jnp.pad(inputs[:, 1:], [(0, 0), (0, 1)]))
        if not with_activations:
            return self.model.apply({"params": params}, inputs, **kw), jnp.zeros((), jnp.float32)
        out, state = self.model.apply({"params": params}, inputs, **kw, mutable=["intermediates"])
        return out, jnp.mean(jnp.stack(jax.tree.leaves(state["intermediates"])))

    def loss(self, params, batch, rng, frozen=None):
        del rng  # no dropout in Jamba
        act_coef = self.config.activation_loss_coef
        out, act = self._forward(params, batch, act_coef > 0)
        ce, tokens = _nll_sum(out, batch)
        objective = ce + tokens * (self.cfg.router_aux_loss_coef * out.aux_loss + act_coef * act)
        return objective, {"loss": ce, "aux_loss": tokens * out.aux_loss, "activation_loss": tokens * act,
                           "tokens": tokens}

    def eval_sums(self, params, batch, frozen=None):
        nll, tokens = _nll_sum(self._forward(params, batch, False)[0], batch)
        return {"nll": nll, "tokens": tokens}

    # --- end of training -----------------------------------------------------------------------------
    def on_end(self, params, frozen=None):
        prompt, n = self.config.sample_prompt, self.config.sample_tokens
        if not prompt or n <= 0:
            return
        ids = np.asarray([[self.tokenizer.bos_id] + self.tokenizer.encode(prompt)], np.int32)
        new = generate(self.model, params, ids, max_new_tokens=n, eos_token_id=self.tokenizer.eos_id,
                       pad_token_id=self.tokenizer.pad_id)[0]
        print(f"greedy sample: {prompt!r} -> {self.tokenizer.decode(new[new != self.tokenizer.pad_id])!r}")


def _nll_sum(out, batch):
    """(summed next-token NLL over real same-document targets, number of those targets)."""
    w = target_weights(batch["inputs"], None, batch["segment_ids"])
    return jnp.sum(out.token_nll[:, :-1] * w), jnp.sum(w)


Task = JambaLMTask
