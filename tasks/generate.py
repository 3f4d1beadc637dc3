"""Generation from a checkpoint, streaming tokens to stdout as they come.

  python main.py --config=configs/generate.py --config.checkpoint=DIR --config.prompt="..."

DIR is a training workdir (its latest checkpoint in DIR/checkpoints), an orbax directory written
by `python -m tasks.convert hf-to-orbax`, or a Hugging Face directory (`jamba_jax.load_checkpoint`).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from common.tokenizers import load_tokenizer, text_streamer
from jamba_jax import GenerationError, JambaForCausalLM, check_generation_args, generate, load_checkpoint
from jamba_jax.hf_checkpoint import CheckpointError


def run(config, workdir: str) -> np.ndarray:
    del workdir
    if not config.checkpoint:
        raise CheckpointError("set --config.checkpoint to a training workdir or a converted orbax directory")
    if not config.prompt:
        raise GenerationError('config.prompt is empty: give the text to continue (--config.prompt="...")')
    cfg, params = load_checkpoint(config.checkpoint)
    tokenizer = load_tokenizer(config.tokenizer, cfg.vocab_size)
    ids = np.asarray([([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(config.prompt)],
                     np.int32)
    sampling = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k or None,
                    top_p=config.top_p or None)
    check_generation_args(ids, cfg.vocab_size, **sampling)  # before anything is printed
    sys.stdout.write(config.prompt)
    sys.stdout.flush()
    out = generate(JambaForCausalLM(cfg), params, jnp.asarray(ids), **sampling, eos_token_id=tokenizer.eos_id,
                   pad_token_id=tokenizer.pad_id, rng=jax.random.PRNGKey(config.seed),
                   prefill_chunk=config.prefill_chunk or None, callback=text_streamer(tokenizer))
    sys.stdout.write("\n")
    return out
