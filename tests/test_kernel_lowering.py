"""Every Pallas kernel lowered for TPU and GPU from this CPU, exactly as those platforms would
compile it (`kernels.target_platform`), at the shapes Jamba-1.5 runs: block-shape rules, VMEM and
shared-memory budgets and unsupported primitives fail here, not on the first pod step.

Each lowered program must contain the platform's kernel call (`tpu_custom_call`; the Triton or
Mosaic GPU custom call), so a silent fallback to XLA fails. A platform without a working kernel
(not in `kernels.KERNEL_PLATFORMS`) is listed as an expected failure, never as a pass.

What lowering cannot check: Mosaic's and Triton's own compilers run on the device (layout
assignment, register allocation); `benchmarks/accelerator.py` compiles and runs the kernels there.
"""

import logging
import re
import sys

import jax
import jax.numpy as jnp
import pytest

from common.attention import AttentionMask, attention, pallas_attention, resolve_attention_impl
from kernels import KERNEL_PLATFORMS, flash_attention, resolve_impl, selective_scan, target_platform
from kernels import platform as kernel_platform
from kernels.int8_matmul import int8_matmul, tpu_blocks, tpu_vmem_bytes
from kernels.ssm_pallas import default_family
from kernels.ssm_pallas_tpu import VMEM_BUDGET, plan, vmem_bytes

LOWERING = {"tpu": "tpu", "gpu": "cuda"}
KERNEL_CALL = {"tpu": re.compile(r"tpu_custom_call"), "gpu": re.compile(r"__gpu\$xla\.gpu\.triton|mosaic_gpu")}
PLATFORMS = [pytest.param(p, marks=() if p in KERNEL_PLATFORMS else
                          pytest.mark.xfail(strict=True, reason=f"no working {p} kernel: auto runs the chunked scan"))
             for p in ("tpu", "gpu")]
sd = jax.ShapeDtypeStruct


def kernel_calls(platform, fn, *args) -> int:
    """How many times the platform's kernel call appears in `fn` lowered for that platform."""
    with target_platform(platform):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=(LOWERING[platform],)).as_text()
    return len(KERNEL_CALL[platform].findall(text))


# (batch, length, d_inner, d_state): Jamba-1.5-Mini's Mamba layer per device with tensor=1 at 4K and
# 256K tokens, Large's d_inner, and an odd shape (nothing divides anything)
SCAN_SHAPES = {"mini_4k": (1, 4096, 8192, 16), "mini_256k": (1, 262144, 8192, 16),
               "large_4k": (1, 4096, 16384, 16), "odd": (3, 1001, 200, 5)}


def scan_args(b, length, d, n, dtype):
    return (sd((b, length, d), dtype), sd((b, length, d), dtype), sd((d, n), jnp.float32), sd((b, length, n), dtype),
            sd((b, length, n), dtype), sd((d,), jnp.float32), sd((b, length, d), dtype), sd((d,), jnp.float32),
            sd((b, length), bool))


def scan_fn(u, delta, A, B, C, D, z, bias, reset):
    return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, reset=reset, impl="auto")


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("shape", sorted(SCAN_SHAPES))
def test_scan_forward_and_gradient_lower_to_the_platform_kernel(platform, shape):
    dtype = jnp.float32 if shape == "odd" else jnp.bfloat16
    args = scan_args(*SCAN_SHAPES[shape], dtype)
    assert kernel_calls(platform, scan_fn, *args) == 1
    grad = jax.grad(lambda *a: jnp.sum(scan_fn(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3, 4, 6))
    assert kernel_calls(platform, grad, *args) == 2  # the forward kernel and the backward kernel


# (M tokens, K, N): the MoE expert matmuls of Jamba-1.5-Mini (hidden 4096, intermediate 14336) and
# Large (8192, 24576) for 2048 routed tokens and for one decoded token, plus an odd shape
INT8_SHAPES = {"mini_up": (2048, 4096, 14336), "mini_down": (2048, 14336, 4096), "large_up": (2048, 8192, 24576),
               "large_down": (2048, 24576, 8192), "large_decode": (1, 8192, 24576), "odd": (7, 100, 33)}


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("shape", sorted(INT8_SHAPES))
def test_int8_matmul_lowers_to_the_platform_kernel(platform, shape):
    m, k, n = INT8_SHAPES[shape]
    args = (sd((m, k), jnp.bfloat16), sd((k, n), jnp.int8), sd((n,), jnp.float32))
    assert kernel_calls(platform, lambda x, w, s: int8_matmul(x, w, s), *args) == 1


# flash attention at Jamba-1.5-Mini's heads per device (32 query heads over 8 kv heads, head dim 128):
# a packed 4K training row (forward kernel under the gradient), a 2K prefill chunk into a 256K cache,
# one decoded token for 64 rows of a 256K cache; and an odd float32 shape (nothing divides anything)
def _attention_train(q, k, v, valid, segments):
    loss = lambda q, k, v: jnp.sum(attention(q, k, v, AttentionMask.causal(valid, segments)).astype(jnp.float32))  # noqa: E731
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _attention_cached(q, k, v, valid, index):
    return attention(q, k, v, AttentionMask.cached(valid, index, q.shape[1]))


def _qkv(b, length, keys, nkv, g, d, dtype):
    return sd((b, length, nkv, g, d), dtype), sd((b, nkv, keys, d), dtype), sd((b, nkv, keys, d), dtype)


ATTENTION_CASES = {
    "mini_train_4k": (_attention_train, (*_qkv(1, 4096, 4096, 8, 4, 128, jnp.bfloat16), sd((1, 4096), bool),
                                         sd((1, 4096), jnp.int32))),
    "mini_prefill_2k_of_256k": (_attention_cached, (*_qkv(1, 2048, 262144, 8, 4, 128, jnp.bfloat16),
                                                    sd((1, 262144), bool), sd((), jnp.int32))),
    "mini_decode_b64_256k": (_attention_cached, (*_qkv(64, 1, 262144, 8, 4, 128, jnp.bfloat16),
                                                 sd((64, 262144), bool), sd((), jnp.int32))),
    "odd": (_attention_train, (*_qkv(3, 100, 100, 2, 2, 64, jnp.float32), sd((3, 100), bool), sd((3, 100), jnp.int32))),
}


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention_lowers_to_the_platform_kernel(platform, case):
    fn, args = ATTENTION_CASES[case]
    assert kernel_calls(platform, fn, *args) == 1  # the forward kernel (the backward is the XLA blockwise one)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8"])
def test_a_decode_step_over_a_low_precision_cache_lowers(platform, kv_dtype):
    """One token for 64 rows of a 256K int8 / bf16 cache at Mini's heads (bf16 compute: bf16 is then the compute
    dtype, and the step takes the kernel; int8 takes the XLA pass that reads the cache in chunks, never the
    kernel, which reads compute-dtype arrays), the write into the cache included."""
    from common.attention import cached_attention, kv_store

    b, keys, nkv, g, d = 64, 262144, 8, 4, 128
    store = jax.eval_shape(lambda: kv_store.empty((b, nkv, keys, d), kv_dtype))

    def step(q, k_new, v_new, k_cache, v_cache, valid, index):
        return cached_attention(q, k_new, v_new, k_cache, v_cache, index, AttentionMask.cached(valid, index, 1))

    args = (sd((b, 1, nkv, g, d), jnp.bfloat16), sd((b, nkv, 1, d), jnp.bfloat16), sd((b, nkv, 1, d), jnp.bfloat16),
            store, store, sd((b, keys), bool), sd((), jnp.int32))
    assert kernel_calls(platform, step, *args) == (1 if kv_dtype == "bfloat16" else 0)


@pytest.mark.parametrize("g", [4, 8])  # Mini (32 / 8 heads) and Large (64 / 8)
def test_tpu_flash_attention_fits_vmem(g):
    for q_len, keys in ((4096, 4096), (1, 262144), (2048, 262144)):
        p = flash_attention.plan("tpu", q_len, keys, g)
        assert p.rows % 8 == 0 and p.bk % 128 == 0
        assert flash_attention.tpu_vmem_bytes(p, 128, 2, segments=True) < VMEM_BUDGET


def test_attention_auto_picks_the_kernel_on_accelerators_and_says_when_it_cannot(monkeypatch, caplog):
    assert resolve_attention_impl("auto", 4, 128) == "blockwise"  # this CPU
    monkeypatch.setattr(kernel_platform, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="kernels"):
        for name in ("tpu", "gpu"):
            with target_platform(name):
                assert resolve_attention_impl("auto", 4, 128) == "pallas"
                assert resolve_attention_impl("auto", 3, 128) == "blockwise"  # 3 heads per kv head: no kernel
                assert resolve_attention_impl("auto", 3, 128) == "blockwise"
    warnings = [r.getMessage() for r in caplog.records if "not a power of two" in r.getMessage()]
    assert len(warnings) == 2, warnings  # once per platform
    fn, args = ATTENTION_CASES["odd"]
    odd = (sd((3, 100, 2, 3, 64), jnp.float32), *args[1:])
    assert kernel_calls("gpu", fn, *odd) == 0
    with pytest.raises(ValueError, match="power of two"):
        with target_platform("gpu"):
            jax.eval_shape(lambda q, k, v, m: pallas_attention(q, k, v, m), *odd[:3],
                           AttentionMask.causal(jnp.ones((3, 100), bool)))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_bf16_jamba_train_step_lowers_with_the_scan_and_attention_kernels(platform):
    """The tiny config's whole training step (forward, loss, backward, AdamW) in bfloat16 with
    scan_impl="auto" and attention_impl="auto": every Mamba layer runs the scan's forward and
    backward kernels, every attention layer the flash-attention forward kernel."""
    from configs import jamba_tiny
    from tasks.jamba_lm import JambaLMTask
    from training.optim import make_optimizer
    from training.step import init_state, make_train_step

    config = jamba_tiny.get_config()
    config.dry_run = True  # no tokenizer needed: only the loss is traced
    config.model.dtype = "bfloat16"
    task = JambaLMTask(config)
    optimizer = make_optimizer(config)
    state = jax.eval_shape(lambda r: init_state(task, optimizer, r), jax.random.PRNGKey(0))
    batch = {"inputs": sd((2, 256), jnp.int32), "segment_ids": sd((2, 256), jnp.int32)}
    attention_layers = sum(task.cfg.is_attention_layer(i) for i in range(task.cfg.num_hidden_layers))
    mamba_layers = task.cfg.num_hidden_layers - attention_layers
    assert attention_layers and mamba_layers
    calls = kernel_calls(platform, make_train_step(task, optimizer, 1), state, batch)
    assert calls == 2 * mamba_layers + attention_layers


@pytest.mark.parametrize("d_inner", [8192, 16384, 4096])  # Mini, Large (tensor=1), Large over tensor=4
def test_tpu_scan_fits_vmem_at_jamba_shapes(d_inner):
    chunk, fwd_tile, bwd_tile, n = plan(262144, d_inner, 16)
    fwd, bwd = vmem_bytes(d_inner, n, chunk, fwd_tile, False), vmem_bytes(d_inner, n, chunk, bwd_tile, True)
    assert fwd < VMEM_BUDGET and bwd < VMEM_BUDGET, (fwd, bwd)
    # and the estimate is no constant: the backward's per-row dA / dh0 blocks grow with d_inner
    assert vmem_bytes(2 * d_inner, n, chunk, bwd_tile, True) > bwd


def test_tpu_int8_matmul_fits_vmem():
    bm, bn, bk = tpu_blocks(2048, 24576, 8192, jnp.bfloat16)
    assert tpu_vmem_bytes(bm, bn, bk, 2) < VMEM_BUDGET


def test_target_platform_steers_auto_and_interpret_mode():
    assert kernel_platform.current_platform() == "cpu" and kernel_platform.interpret_mode()
    assert resolve_impl("auto") == "scan"
    for name, family in (("tpu", "tpu"), ("gpu", "gpu")):
        with target_platform(name):
            assert resolve_impl("auto") == "pallas" and default_family() == family
            assert not kernel_platform.interpret_mode()
    assert kernel_platform.current_platform() == "cpu"
    with pytest.raises(ValueError, match="target_platform"):
        with target_platform("cuda"):
            pass


def test_auto_falls_back_to_chunked_and_says_so_where_a_platform_has_no_kernel(monkeypatch, caplog):
    scan_module = sys.modules["kernels.selective_scan"]  # the package exports the function of that name
    monkeypatch.setattr(scan_module, "KERNEL_PLATFORMS", ("tpu",))
    monkeypatch.setattr(kernel_platform, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="kernels"):
        with target_platform("gpu"):
            assert resolve_impl("auto") == "chunked"
            assert resolve_impl("auto") == "chunked"
        assert kernel_calls("gpu", scan_fn, *scan_args(1, 256, 256, 16, jnp.bfloat16)) == 0
    warnings = [r for r in caplog.records if "no Pallas kernel for platform 'gpu'" in r.getMessage()]
    assert len(warnings) == 1


def test_cpu_fast_paths_sit_behind_impl_choices():
    """The CPU's fast paths (the dense and blocked expert FFNs, the matmul cumulative sum) are choices of
    `impl=`; "auto" picks them on a CPU only, and the GPU / TPU programs take the portable forms."""
    from kernels.cumsum import cumsum_impl
    from kernels.grouped_matmul import expert_ffn_impl

    assert cumsum_impl("auto") == "matmul" and expert_ffn_impl("auto", 1, 4, 2) == "dense"
    assert expert_ffn_impl("auto", 1024, 4, 2) == "blocked"
    for platform in ("gpu", "tpu"):
        with target_platform(platform):
            assert cumsum_impl("auto") == "xla" and expert_ffn_impl("auto", 1, 4, 2) == "ragged"
    with pytest.raises(ValueError, match="cumsum impl"):
        cumsum_impl("nope")
    with pytest.raises(ValueError, match="expert FFN impl"):
        expert_ffn_impl("nope", 1, 4, 2)
