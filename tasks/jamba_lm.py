"""Jamba language-model training as a task of the shared loop: from scratch, or fine-tuning a checkpoint.

Loss per target token: next-token cross-entropy (float32) + router_aux_loss_coef x the Switch
load-balancing loss + activation_loss_coef x the mean over layers of the mean square of each
decoder block's output (Jamba-1.5's activation loss, which keeps activations small enough for
16-bit inference; 0 in the tiny default).

`config.init_from = DIR` starts from a checkpoint (`jamba_jax.load_checkpoint`: a Hugging Face directory,
a converted orbax directory or a training workdir, `config.init_step` for its step), loaded straight into
the sharded train state. With `config.lora.rank > 0` the checkpoint is instead the frozen base (the task's
frozen inputs, streamed onto the mesh, optionally ExpertsInt8: `config.lora.base_quantize`) and the
parameters are LoRA adapters on `config.lora.targets` (`jamba_jax.lora`). The model is the checkpoint's:
the config file's architecture fields give way to it, its numerics and execution fields
(JambaConfig.WEIGHT_NEUTRAL_FIELDS: dtype, remat_policy, ...) apply, and a --config.model.* on the command
line that would change the weights is refused. The tokenizer is the
checkpoint directory's tokenizer.json when it has one and config.data.tokenizer is not set. A resumed
run restores its own checkpoint and never reads init_from's weights; the run records where it started.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from common.tokenizers import load_tokenizer
from jamba_jax import (
    ConfigError,
    JambaConfig,
    JambaForCausalLM,
    format_param_table,
    generate,
    init_params,
    load_checkpoint,
    locate_checkpoint,
)
from jamba_jax.checkpoint import checkpoint_config, checkpoint_tokenizer
from jamba_jax.config import WEIGHT_NEUTRAL_FIELDS
from jamba_jax.lora import LoraConfig, LoraError, adapter_specs, init_adapters, with_adapters
from jamba_jax.losses import target_weights
from jamba_jax.params import abstract_params, activation_bytes, param_logical_specs
from jamba_jax.quantization import quantize_experts_int8
from training.data import lm_dataset, text_source
from training.sft_data import sft_dataset, sft_examples
from training.task import FrozenInputs, Task


def start_of(config):
    """(the checkpoint to start from or None, the model config): module docstring."""
    if not config.get("init_from", ""):
        return None, JambaConfig.from_dict(config.model.to_dict())
    step = config.get("init_step", -1)
    source = locate_checkpoint(config.init_from, None if step < 0 else step)
    refused = [f for f in config.get("cli_overrides", ()) if f.startswith("model.")
               and f[len("model."):] not in WEIGHT_NEUTRAL_FIELDS]
    if refused:
        raise ConfigError(f"--config.{refused[0]} would change the weights of {source.description}: a run started "
                          f"from a checkpoint takes the model from it; only {', '.join(WEIGHT_NEUTRAL_FIELDS)} may "
                          "change")
    return source, checkpoint_config(source).with_weight_neutral(config.model.to_dict())


class JambaLMTask(Task):
    name = "jamba_lm"

    def __init__(self, config):
        self.config = config
        self.start, self.cfg = start_of(config)
        self.lora = LoraConfig.from_config(config.get("lora", {}))
        if self.lora.rank:
            if self.start is None and not config.dry_run:
                raise LoraError("config.lora.rank > 0 trains adapters on a checkpoint: set config.init_from")
            self.cfg = self.cfg.replace(lora_dropout=self.lora.dropout)
        self.model = JambaForCausalLM(self.cfg)
        self.tokenizer_path = config.data.tokenizer
        if not self.tokenizer_path and self.start is not None:  # the data as the model was trained on it
            self.tokenizer_path = checkpoint_tokenizer(self.start)
        self.tokenizer = None if config.dry_run else load_tokenizer(
            self.tokenizer_path, self.cfg.vocab_size, "" if self.start is None else self.start.description)
        print(format_param_table(self.cfg))

    def meta(self) -> dict:
        """The model (and LoRA settings), and as provenance (not compared on resume) the tokenizer and where a
        full fine-tuning started; a LoRA run's base is a frozen input, whose source and digest the loop records
        and checks."""
        meta = {"task": self.name, "model": dataclasses.asdict(self.cfg),
                "provenance": {"tokenizer": os.path.abspath(self.tokenizer_path) if self.tokenizer_path else ""}}
        if self.lora.rank:
            meta["lora"] = dataclasses.asdict(self.lora)
        elif self.start is not None:
            meta["provenance"].update(init_from=self.start.description, digest=self.start.digest())
        return meta

    def init_params(self, rng):
        return init_adapters(self.cfg, self.lora, rng) if self.lora.rank else init_params(self.cfg, rng)

    def initial_params(self, shardings):
        if self.start is None or self.lora.rank:
            return None
        print(f"starting from {self.start.description}")
        return load_checkpoint(self.start, shardings=shardings, **self.cfg.weight_neutral())[1]

    def param_specs(self, params):
        return adapter_specs(self.cfg, self.lora) if self.lora.rank else param_logical_specs(self.cfg)

    def frozen_inputs(self):
        """With LoRA: the base (abstract here; streamed from init_from onto the mesh by `load`)."""
        if not self.lora.rank:
            return None
        base = abstract_params(self.cfg)
        quantize = self.lora.base_quantize or None
        if quantize:
            base = jax.eval_shape(lambda p: quantize_experts_int8(self.cfg, p), base)
        source, digest = ("(none: a dry run)", "") if self.start is None else (self.start.description,
                                                                               self.start.digest())

        def load(shardings):
            print(f"base from {source}")
            return load_checkpoint(self.start, quantize=quantize, shardings=shardings, **self.cfg.weight_neutral())[1]

        return FrozenInputs(base, source=source, specs=param_logical_specs(self.cfg, base), digest=digest or "dry-run",
                            load=load)

    def model_params(self, params, frozen):
        """What the model applies: the parameters, or with LoRA the frozen base with the adapters beside it."""
        return with_adapters(frozen, params, self.lora.scale) if self.lora.rank else params

    def activation_bytes(self, rows: int, seq_len: int, context_shards: int = 1) -> int:
        return activation_bytes(self.cfg, rows, seq_len, context_shards)

    def dataset(self, split, train, process_index, process_count):
        """Packed documents (config.data.format "text"), or whole records with per-token loss weights ("chat",
        "prompt_completion": `training.sft_data`)."""
        c = self.config
        kw = dict(batch_size=c.batch_size, seq_len=c.seq_len, seed=c.seed, train=train, process_index=process_index,
                  process_count=process_count)
        if c.data.get("format", "text") == "text":
            return lm_dataset(text_source(c.data, split), self.tokenizer, **kw)
        return sft_dataset(sft_examples(c.data, self.tokenizer, split, c.seq_len), **kw)

    def sums(self, params, batch, rng, frozen):
        """Next-token NLL of the real same-document targets (the model's chunked `token_nll`: no logits array),
        the load-balancing loss and, when its coefficient is set, the activation loss, each per target."""
        inputs, segments = batch["inputs"], batch["segment_ids"]
        act_coef = self.config.activation_loss_coef
        variables = {"params": self.model_params(params, frozen)}
        args = (inputs, jnp.pad(inputs[:, 1:], [(0, 0), (0, 1)]), None, segments)
        kw = {"rngs": {"dropout": rng}} if rng is not None and self.cfg.lora_dropout > 0 else {}  # LoRA's only
        if act_coef > 0:
            out, state = self.model.apply(variables, *args, method="token_nll", mutable=["intermediates"], **kw)
            act = jnp.mean(jnp.stack(jax.tree.leaves(state["intermediates"])))
        else:
            out, act = self.model.apply(variables, *args, method="token_nll", **kw), jnp.zeros((), jnp.float32)
        w = target_weights(inputs, None, segments)
        if "weights" in batch:  # instruction data: the loss on the tokens it marks (the assistant's)
            w = w * batch["weights"][:, 1:]
        nll, tokens = jnp.sum(out.token_nll[:, :-1] * w), jnp.sum(w)
        sums = {"loss": nll, "tokens": tokens, "aux_loss": tokens * out.aux_loss,
                "objective": nll + tokens * (self.cfg.router_aux_loss_coef * out.aux_loss + act_coef * act)}
        return {**sums, "activation_loss": tokens * act} if act_coef > 0 else sums

    def on_end(self, params, frozen):
        prompt, n = self.config.sample_prompt, self.config.sample_tokens
        if not prompt or n <= 0:
            return
        ids = np.asarray([[self.tokenizer.bos_id] + self.tokenizer.encode(prompt)], np.int32)
        new = generate(self.model, self.model_params(params, frozen), ids, max_new_tokens=n,
                       eos_token_id=self.tokenizer.eos_id, pad_token_id=self.tokenizer.pad_id)[0]
        print(f"greedy sample: {prompt!r} -> {self.tokenizer.decode(new[new != self.tokenizer.pad_id])!r}")


Task = JambaLMTask
