"""Generation from a checkpoint, streaming tokens to stdout as they come.

  python main.py --config=configs/generate.py --config.checkpoint=DIR --config.prompt="..."
  python main.py --config=configs/generate.py --config.checkpoint=DIR --config.chat=True --config.prompt="..."

DIR is a training workdir (its newest checkpoint; a LoRA run's adapters merged into its base), an orbax
directory written by `python -m tasks.convert hf-to-orbax`, or a Hugging Face directory
(`jamba_jax.load_checkpoint`). The tokenizer is config.tokenizer, else the checkpoint's own (a directory's
tokenizer.json, the one a run trained with), else the bundled BPE. With config.chat the prompt is a user's
message (after config.system's, when set), rendered with the tokenizer's chat template and the assistant's
turn opened, and only the reply is printed; generation stops at <eos> or at any end token the checkpoint's
generation_config.json names (Jamba-1.5's end of message).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from common.tokenizers import load_tokenizer, text_streamer
from jamba_jax import GenerationError, JambaForCausalLM, check_generation_args, generate, load_checkpoint
from jamba_jax.checkpoint import checkpoint_end_tokens, checkpoint_tokenizer, locate_checkpoint
from jamba_jax.hf_checkpoint import CheckpointError


def prompt_ids(config, tokenizer) -> list[int]:
    """The prompt's token ids: text after <bos>, or with config.chat a conversation's opening (module docstring)."""
    if config.get("chat", False):
        messages = ([{"role": "system", "content": config.system}] if config.get("system", "") else []) + [
            {"role": "user", "content": config.prompt}]
        return tokenizer.encode_chat(messages, add_generation_prompt=True)[0]
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(config.prompt)


def run(config, workdir: str) -> np.ndarray:
    del workdir
    if not config.checkpoint:
        raise CheckpointError("set --config.checkpoint to a training workdir or a converted orbax directory")
    if not config.prompt:
        raise GenerationError('config.prompt is empty: give the text to continue (--config.prompt="...")')
    source = locate_checkpoint(config.checkpoint)
    cfg, params = load_checkpoint(source)
    cfg = cfg.replace(kv_cache_dtype=config.get("kv_cache_dtype") or cfg.kv_cache_dtype)  # (checked: one line)
    tokenizer = load_tokenizer(config.tokenizer or checkpoint_tokenizer(source), cfg.vocab_size, source.description,
                               field="config.tokenizer")
    ids = np.asarray([prompt_ids(config, tokenizer)], np.int32)
    sampling = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k or None,
                    top_p=config.top_p or None)
    check_generation_args(ids, cfg.vocab_size, **sampling)  # before anything is printed
    if not config.get("chat", False):
        sys.stdout.write(config.prompt)
        sys.stdout.flush()
    out = generate(JambaForCausalLM(cfg), params, jnp.asarray(ids), **sampling,
                   eos_token_id=checkpoint_end_tokens(source, tokenizer), pad_token_id=tokenizer.pad_id,
                   rng=jax.random.PRNGKey(config.seed), prefill_chunk=config.prefill_chunk or None,
                   callback=text_streamer(tokenizer))
    sys.stdout.write("\n")
    return out
