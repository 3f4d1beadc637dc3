"""A request's sampling settings and their checks, and the sampler of a decode step in which every row
(slot) samples with its own settings: temperature (0 = greedy), top_k, top_p and a seed per row.

`sample_rows` filters as `jamba_jax.generation.sample_logits` does for one setting (top_k first, then the
smallest set of the remaining tokens whose probability reaches top_p), with arrays instead of constants,
so one compiled step serves any mix of requests. A row's random key is its seed folded with the number of
tokens it has generated, so a seeded request samples the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from common.errors import UserError


class RequestError(UserError):
    """A request that cannot run as given; `param` names the offending field (OpenAI's error body)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler (OpenAI's names and defaults; top_k 0 = off)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # strings that end the output (not included in its text)
    stop_token_ids: tuple[int, ...] = ()  # tokens that end it, beside the model's end tokens
    ignore_eos: bool = False  # run to max_tokens past the end tokens (benchmarks)

    def check(self, vocab_size: int) -> None:
        """Raises RequestError naming the first parameter out of range."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise RequestError(f"temperature must lie in [0, 2], got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must lie in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 = off), got {self.top_k}", "top_k")
        if self.seed is not None and not 0 <= self.seed < 2**31:
            raise RequestError(f"seed must lie in [0, 2^31), got {self.seed}", "seed")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must not be empty", "stop")
        if any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise RequestError(f"stop_token_ids must lie in [0, {vocab_size})", "stop_token_ids")


def sample_rows(logits_BxV, temperature_B, top_k_B, top_p_B, seed_B, step_B):
    """One token per row [B] int32: argmax where temperature is 0, else a draw from softmax(logits / T)
    restricted to the top_k tokens (0: all) and then to the smallest set reaching top_p (1: all). A batch
    with no sampled row, or no filtered one, skips the draw or the sort (`lax.cond`: one branch runs)."""
    logits = logits_BxV.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling = temperature_B > 0

    def draw(_):
        x = logits / jnp.where(sampling, temperature_B, 1.0)[:, None]
        filtered = sampling & ((top_k_B > 0) | (top_p_B < 1.0))
        x = jax.lax.cond(jnp.any(filtered), lambda x: _filter(x, top_k_B, top_p_B), lambda x: x, x)
        keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.PRNGKey(s), n))(seed_B, step_B)
        drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, x).astype(jnp.int32)
        return jnp.where(sampling, drawn, greedy)

    return jax.lax.cond(jnp.any(sampling), draw, lambda _: greedy, None)


def _filter(x_BxV, top_k_B, top_p_B):
    """Logits outside each row's top_k (0: all), then outside the smallest set reaching its top_p, at -inf
    (the float32 minimum)."""
    vocab = x_BxV.shape[-1]
    neg = jnp.finfo(jnp.float32).min
    sorted_x = -jnp.sort(-x_BxV, axis=-1)  # descending
    k = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, vocab), vocab)
    kth = jnp.take_along_axis(sorted_x, (k - 1)[:, None], axis=-1)  # [B, 1]
    kept = jnp.where(jnp.arange(vocab)[None] < k[:, None], sorted_x, neg)
    probs = jax.nn.softmax(kept, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass ranked above each token
    p = jnp.where(top_p_B < 1.0, top_p_B, 2.0)[:, None]  # 1: no cut (rounding must not drop the tail)
    cutoff = jnp.min(jnp.where(before < p, kept, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x_BxV < jnp.maximum(kth, cutoff), neg, x_BxV)
