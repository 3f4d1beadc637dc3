"""Softmax attention without a [queries, keys] array, on grouped-query layouts.

q [B, L, H, G, D] (H kv heads, G query heads per kv head), k and v [B, H, S, D] (heads-major, as
transformers' caches and the kernels keep them: a key block of one head is contiguous). Which keys a
query sees is an `AttentionMask` (positions, the padding mask and segment ids); the attention loops
build each [q block, k block] piece of the mask where they need it, so memory is O(L + S) whatever the
lengths.

  mask        AttentionMask, and reference_attention (materialised: the tests' reference only)
  blocks      the shared tiling: Plan, the rows layout, block masks, visible key-block ranges
  blockwise   the XLA path (every platform) and the backward every path differentiates through
  kernel      the Pallas forward kernels (TPU, GPU) of `kernels.flash_attention`
  dispatch    `attention(..., impl=)`: "blockwise", "pallas", or "auto" (blockwise on CPU, Pallas elsewhere)
  cached      the decode step's path over a cache (few queries, the cache written in place)
  kv_store    how a cache holds keys or values: an array of its dtype, or int8 with a scale per position and head
"""

from common.attention import kv_store
from common.attention.blockwise import blockwise_attention
from common.attention.cached import cached_attention
from common.attention.dispatch import ATTENTION_IMPLS, attention, resolve_attention_impl
from common.attention.kernel import pallas_attention
from common.attention.mask import AttentionMask, reference_attention

__all__ = ["ATTENTION_IMPLS", "AttentionMask", "attention", "blockwise_attention", "cached_attention",
           "kv_store", "pallas_attention", "reference_attention", "resolve_attention_impl"]
