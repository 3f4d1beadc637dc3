"""Generation with the hybrid cache: chunked prefill, then decoding: one compiled
while-loop over all steps, or (when streaming through a callback) one jitted step per token.

Prefill feeds the prompt in chunks of `prefill_chunk` tokens, carrying the Mamba states and filling
the KV cache, so a long prompt needs the weights, the KV cache and one chunk's activations; by default
the chunk is the largest power of two whose activations fit PREFILL_BUDGET_BYTES (never the whole of
a long prompt), and only the last position's logits are computed. Decoding
runs with static shapes (no recompilation per token): without a callback as one compiled
while-loop over all steps, with a callback as one call of a single jitted step per token.
Left-padded batches work (pass their attention_mask); each row stops at its own EOS and is padded
with pad_token_id after it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from common.errors import UserError
from jamba_jax.model import JambaForCausalLM, check_token_ids
from jamba_jax.params import forward_bytes_per_token

PREFILL_BUDGET_BYTES = 256 * 2**20  # one prefill chunk's activations (the default chunk's size)
MIN_PREFILL_CHUNK, MAX_PREFILL_CHUNK = 256, 16384
PROGRESS_MIN_TOKENS = 32768  # prompts this long show a progress bar


class GenerationError(UserError):
    """Generation arguments that cannot work (empty prompt, too long, bad sampling settings)."""


def sample_logits(logits_BxV, rng, temperature: float, top_k: int | None, top_p: float | None):
    """Greedy at temperature 0; otherwise softmax(logits / temperature) restricted to the top_k
    tokens and to the smallest set whose probability reaches top_p."""
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def default_prefill_chunk(cfg, batch: int, prompt_len: int, budget_bytes: int = PREFILL_BUDGET_BYTES) -> int:
    """The prompt chunk `prefill` uses by default: the largest power of two (within
    [MIN_PREFILL_CHUNK, MAX_PREFILL_CHUNK]) whose forward activations for `batch` rows fit
    `budget_bytes` (`jamba_jax.params.forward_bytes_per_token`), or the whole prompt if shorter."""
    fits = max(budget_bytes // max(batch * forward_bytes_per_token(cfg), 1), 1)
    chunk = min(max(1 << (int(fits).bit_length() - 1), MIN_PREFILL_CHUNK), MAX_PREFILL_CHUNK)
    return min(chunk, prompt_len)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def prefill_step(model: JambaForCausalLM, params, cache, ids_BxC, mask_BxC):
    """One chunk of a prompt into the (donated) cache: (float32 logits [B, V] of its last position, cache)."""
    out = model.apply({"params": params}, ids_BxC, cache, attention_mask=mask_BxC, method="prefill")
    return out.logits.astype(jnp.float32), out.cache


def _decode_body(model, params, cache, logits_BxV, done_B, rng, temperature, top_k, top_p, eos_id, pad_id):
    """Samples the next token from `logits`, then runs it through the model: (token, done, logits, cache)."""
    token = sample_logits(logits_BxV, rng, temperature, top_k, top_p)
    token = jnp.where(done_B, pad_id, token)
    if eos_id is not None:  # one id or a tuple of them (a config's eos_token_id may be a list)
        done_B = done_B | jnp.isin(token, jnp.asarray(eos_id, jnp.int32))
    out = model.apply({"params": params}, token, cache, method="decode")
    return token, done_B, out.logits.astype(jnp.float32), out.cache


decode_step = jax.jit(_decode_body, static_argnums=(0, 6, 7, 8, 9, 10), donate_argnums=(2,))
decode_step.__doc__ = "One decode step, jitted, the cache donated: (token [B], done [B], logits [B, V], cache)."


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9, 10, 11))
def decode_loop(model, params, cache, logits_BxV, done_B, rng, n_steps, temperature, top_k, top_p, eos_id, pad_id):
    """All `n_steps` decode steps in one compiled while-loop (stops early once every row is done)."""
    b = logits_BxV.shape[0]

    def cond(carry):
        step, _, _, done, _ = carry
        return (step < n_steps) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, done, tokens = carry
        token, done, logits, cache = _decode_body(model, params, cache, logits, done, jax.random.fold_in(rng, step),
                                                  temperature, top_k, top_p, eos_id, pad_id)
        return step + 1, cache, logits, done, tokens.at[:, step].set(token)

    tokens = jnp.full((b, n_steps), pad_id, jnp.int32)
    init = (jnp.zeros((), jnp.int32), cache, logits_BxV, done_B, tokens)
    return jax.lax.while_loop(cond, body, init)[4]


def prefill(model: JambaForCausalLM, params, input_ids, attention_mask=None, max_length: int | None = None,
            prefill_chunk: int | None = None, cache_dtype=None, cache=None):
    """Runs the prompt through the model in chunks; returns (float32 logits [B, V] of its last position, cache).

    `model` is a JambaForCausalLM, or any object with its generation interface: `cfg`,
    `init_cache(batch, max_length, dtype)` and `apply(variables, ..., method="prefill" | "decode")` with
    its entry points' signatures (e.g. an auxiliary-tuned LM). `cache` continues from a cache already
    holding something (the auxiliary model's keyword segment) instead of a fresh one (it is copied, not
    consumed). prefill_chunk: tokens per step (default: `default_prefill_chunk`).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    b, p = input_ids.shape
    mask = jnp.ones((b, p), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    if cache is None:
        cache = model.init_cache(b, max_length or p, cache_dtype)
    else:  # the chunks consume (donate) the cache they are given
        cache = jax.tree.map(jnp.copy, cache)
    chunk = prefill_chunk or default_prefill_chunk(model.cfg, b, p)
    logits = None
    with tqdm(total=p, desc="prefill", unit="tok", unit_scale=True, disable=p < PROGRESS_MIN_TOKENS,
              leave=False) as bar:
        for start in range(0, p, chunk):
            logits, cache = prefill_step(model, params, cache, input_ids[:, start:start + chunk],
                                         mask[:, start:start + chunk])
            bar.update(min(chunk, p - start))
    return logits, cache


def check_generation_args(input_ids, vocab_size: int, max_new_tokens: int, temperature: float = 0.0,
                          top_k: int | None = None, top_p: float | None = None, max_length: int | None = None,
                          attention_mask=None) -> int:
    """Raises GenerationError (or TokenIdError) for arguments `generate` cannot run; returns the cache
    length the request needs (max_length, default prompt + max_new_tokens)."""
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise GenerationError(f"input_ids must be a non-empty [batch, prompt] array; got shape {input_ids.shape}")
    check_token_ids(input_ids, vocab_size)
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if temperature < 0:
        raise GenerationError(f"temperature={temperature} must be >= 0")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p={top_p} must lie in (0, 1]")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k={top_k} must be at least 1")
    needed = input_ids.shape[1] + max_new_tokens
    if needed > (max_length or needed):
        raise GenerationError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {needed} "
                              f"exceeds the cache's max_length ({max_length})")
    if attention_mask is not None and not np.asarray(attention_mask).any(axis=1).all():
        raise GenerationError("a row of attention_mask has no real token: every prompt needs at least one")
    return max_length or needed


def generate(model: JambaForCausalLM, params, input_ids, attention_mask=None, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, pad_token_id: int | None = None, rng=None,
             max_length: int | None = None, prefill_chunk: int | None = None,
             callback: Callable[[int, np.ndarray], None] | None = None, cache=None) -> np.ndarray:
    """New tokens [batch, max_new_tokens] (int32); rows that hit EOS are padded with pad_token_id.

    input_ids: [batch, prompt] (left-padded, with attention_mask, for a batch of unequal prompts).
    max_length: cache size (default prompt + max_new_tokens); a longer request is an error.
    callback(step, tokens [batch]) is called as each token arrives (streaming).
    cache: start from this cache (see `prefill`); its size bounds prompt + new tokens.
    """
    input_ids = np.asarray(input_ids)
    max_length = check_generation_args(input_ids, model.cfg.vocab_size, max_new_tokens, temperature, top_k, top_p,
                                       max_length, attention_mask)
    pad_id = model.cfg.pad_token_id if pad_token_id is None else pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    eos_id = tuple(eos_token_id) if isinstance(eos_token_id, list) else eos_token_id
    rng = jax.random.PRNGKey(0) if rng is None else rng
    sampling = (float(temperature), top_k, top_p, eos_id, pad_id)

    logits, cache = prefill(model, params, input_ids, attention_mask, max_length, prefill_chunk, cache=cache)
    done = jnp.zeros((input_ids.shape[0],), bool)
    if callback is None:  # no streaming: the whole decode runs as one compiled loop
        return np.asarray(decode_loop(model, params, cache, logits, done, rng, max_new_tokens, *sampling))
    tokens = np.full((input_ids.shape[0], max_new_tokens), pad_id, np.int32)
    for step in range(max_new_tokens):
        token, done, logits, cache = decode_step(model, params, cache, logits, done, jax.random.fold_in(rng, step),
                                                 *sampling)
        tokens[:, step] = np.asarray(token)
        callback(step, tokens[:, step])
        if bool(jnp.all(done)):
            break
    return tokens
