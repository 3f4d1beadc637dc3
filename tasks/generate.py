"""Generation from a checkpoint, streaming tokens to stdout as they come.

  python main.py --config=configs/generate.py --config.checkpoint=DIR --config.prompt="..."

DIR is a training workdir (its latest checkpoint in DIR/checkpoints), an orbax directory written
by `python -m tasks.convert hf-to-orbax`, or a Hugging Face directory.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jamba_jax import JambaConfig, JambaForCausalLM, generate, load_hf_checkpoint, quantize_experts_int8
from jamba_jax.hf_checkpoint import CheckpointError
from jamba_jax.orbax_io import CONFIG_FILE, load_params
from jamba_jax.params import abstract_params
from training.checkpoint import CheckpointNotFoundError, restore_run_params
from training.data import load_tokenizer


def load_checkpoint(path: str, step: int | None = None, quantize: str | None = None) -> tuple[JambaConfig, dict]:
    """(cfg, params) from a converter directory, a Hugging Face directory (config.json +
    safetensors) or a training run's latest checkpoint (or `step`); `quantize="experts_int8"`
    quantises them (ExpertsInt8) as they load."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, "config.json")) and not os.path.exists(os.path.join(path, CONFIG_FILE)):
        return load_hf_checkpoint(path, quantize=quantize or None)  # quantised tensor by tensor as it reads
    if quantize:
        cfg, params = load_checkpoint(path, step)
        return cfg, quantize_experts_int8(cfg, params)
    if os.path.exists(os.path.join(path, CONFIG_FILE)):
        if step is not None:
            raise CheckpointError(f"{path} is a converted orbax directory (one set of parameters); --step is for "
                                  "training workdirs")
        return load_params(path)
    try:
        meta, _, step = restore_run_params(path, None, step)  # the metadata first: which model is it?
    except CheckpointNotFoundError as e:
        raise CheckpointError(f"{path}: holds neither {CONFIG_FILE} nor a training checkpoint ({e})") from e
    if "model" not in meta or meta.get("task", "jamba_lm") != "jamba_lm":
        raise CheckpointError(f"{path} (step {step}): the checkpoint's metadata names no Jamba model")
    cfg = JambaConfig.from_dict(meta["model"])
    _, params, _ = restore_run_params(path, abstract_params(cfg), step)  # params only
    return cfg, params


def text_streamer(tokenizer):
    """A `generate` callback that prints the text each new token of row 0 adds (EOS prints nothing)."""
    emitted: list[int] = []

    def stream(step, tokens):
        before = tokenizer.decode(emitted)
        if tokens[0] != tokenizer.eos_id:
            emitted.append(int(tokens[0]))
        sys.stdout.write(tokenizer.decode(emitted)[len(before):])
        sys.stdout.flush()

    return stream


def run(config, workdir: str) -> np.ndarray:
    del workdir
    if not config.checkpoint:
        raise CheckpointError("set --config.checkpoint to a training workdir or a converted orbax directory")
    cfg, params = load_checkpoint(config.checkpoint)
    tokenizer = load_tokenizer(config.tokenizer, cfg.vocab_size)
    ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(config.prompt)
    model = JambaForCausalLM(cfg)
    sys.stdout.write(config.prompt)
    sys.stdout.flush()
    stream = text_streamer(tokenizer)

    out = generate(model, params, jnp.asarray([ids], jnp.int32), max_new_tokens=config.max_new_tokens,
                   temperature=config.temperature, top_k=config.top_k or None, top_p=config.top_p or None,
                   eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                   rng=jax.random.PRNGKey(config.seed), prefill_chunk=config.prefill_chunk or None, callback=stream)
    sys.stdout.write("\n")
    return out
