"""`attention`: softmax attention by the implementation the platform (or the caller) picks."""

from __future__ import annotations

from common.attention.blockwise import blockwise_attention
from common.attention.context import context_parallel_attention, context_split
from common.attention.kernel import pallas_attention
from common.attention.mask import AttentionMask
from kernels import flash_attention
from kernels.platform import current_platform, log_once

ATTENTION_IMPLS = ("auto", "blockwise", "pallas")


def resolve_attention_impl(impl: str, g: int, d: int) -> str:
    """'auto' -> 'blockwise' on CPU; 'pallas' on GPU and TPU where the kernel takes the heads' shape,
    else 'blockwise' with a warning logged once."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl={impl!r}: expected one of {ATTENTION_IMPLS}")
    if impl != "auto":
        return impl
    platform = current_platform()
    if platform == "cpu":
        return "blockwise"
    why = flash_attention.unsupported(platform, g, d) if platform in flash_attention.FAMILIES else "no kernel"
    if why:
        log_once("attention", f"attention on {platform}: {why}; impl='auto' runs the blockwise XLA path")
        return "blockwise"
    return "pallas"


def attention(q_BxLxHxGxD, k_BxHxSxD, v_BxHxSxD, mask: AttentionMask, impl: str = "auto"):
    """Softmax attention of q over k, v under `mask`, by implementation `impl`:

    - "blockwise": `blockwise_attention` (XLA; every platform);
    - "pallas": `pallas_attention` (the platform's Pallas forward kernel, `kernels.flash_attention`);
    - "auto": the blockwise path on CPU, the Pallas kernel on GPU and TPU (`resolve_attention_impl`).

    Under a mesh that splits the token dimension (context parallelism), each device runs it over its slice
    of the queries and the gathered keys (`common.attention.context`).
    """
    impl = resolve_attention_impl(impl, q_BxLxHxGxD.shape[3], q_BxLxHxGxD.shape[4])
    attend = pallas_attention if impl == "pallas" else blockwise_attention
    split = context_split(q_BxLxHxGxD, k_BxHxSxD, mask)
    if split is not None:
        return context_parallel_attention(attend, q_BxLxHxGxD, k_BxHxSxD, v_BxHxSxD, mask, *split)
    return attend(q_BxLxHxGxD, k_BxHxSxD, v_BxHxSxD, mask)
