"""common.attention: the blockwise (flash) path against the materialised reference, in values and
gradients, for every mask form the models build; and its memory, which must not grow as L x S."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.attention import AttentionMask, attention, blockwise_attention, pallas_attention, reference_attention
from common.attention.cached import FEW_ROWS, cached_attention
from kernels import flash_attention

B, V, G, D = 2, 2, 3, 8  # two kv heads, three query heads each


def qkv(length, keys, seed=0, dtype=jnp.float32, g=G, d=D):
    r = np.random.RandomState(seed)
    q = jnp.asarray(r.randn(B, length, V, g, d), dtype)
    k = jnp.asarray(r.randn(B, V, keys, d), dtype)
    v = jnp.asarray(r.randn(B, V, keys, d), dtype)
    return q, k, v


def masks(length):
    """name -> (mask, query length, key length, [B, L] rows whose output is defined)."""
    valid = np.ones((B, length), bool)
    valid[1, :6] = False  # left padding
    seg = np.array([[1] * 7 + [2] * (length - 12) + [3] * 5, [0] * 4 + [1] * (length - 4)])
    cache_len, index, new = length + 9, 5, 6  # 6 new tokens written at slot 5; slots past 11 unwritten
    key_valid = np.zeros((B, cache_len), bool)
    key_valid[:, : index + new] = True
    key_valid[0, :2] = False  # row 0 was left-padded by two
    out = {
        "causal": (AttentionMask.causal(jnp.asarray(valid)), length, length, valid),
        "packed": (AttentionMask.causal(jnp.asarray(seg != 0), jnp.asarray(seg)), length, length, seg != 0),
        "bidirectional": (AttentionMask.bidirectional(jnp.asarray(valid)), length, length,
                          np.ones((B, length), bool)),
        "cached": (AttentionMask.cached(jnp.asarray(key_valid), jnp.int32(index), new), new, cache_len,
                   np.ones((B, new), bool)),
    }
    return out


CASES = [(kind, blocks) for kind in ("causal", "packed", "bidirectional", "cached")
         for blocks in ((4, 4), (3, 5), (8, 2))] + [("causal", (256, 512))]  # the last: one block holds all


@pytest.mark.parametrize("kind,blocks", CASES)
def test_blockwise_matches_reference_values_and_gradients(kind, blocks):
    """Values and q/k/v gradients equal the reference's on every row with a visible key, for block
    sizes that do and do not divide the lengths (23 queries, 32 cache slots), with key blocks skipped
    at both ends (left padding, unwritten cache slots) and past each causal query block."""
    mask, length, keys, rows = masks(23)[kind]
    q, k, v = qkv(length, keys, seed=len(kind))
    cot = jnp.asarray(np.random.RandomState(1).randn(*q.shape) * rows[:, :, None, None, None], jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

    blockwise = lambda q, k, v: blockwise_attention(q, k, v, mask, *blocks)  # noqa: E731
    reference = lambda q, k, v: reference_attention(q, k, v, mask)  # noqa: E731
    got, want = blockwise(q, k, v), reference(q, k, v)
    # float32, but summed in another order (online softmax, block by block): a few ulps of O(1) values
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=2e-5, rtol=2e-5)
    g_got = jax.grad(loss(blockwise), argnums=(0, 1, 2))(q, k, v)
    g_want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    # gradients accumulate over every key / query block in float32: a few more ulps than the values
    for name, a, b in zip("qkv", g_got, g_want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=5e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("family", ["tpu", "gpu"])
@pytest.mark.parametrize("kind", ["causal", "packed", "bidirectional", "cached"])
def test_pallas_kernels_match_reference_values_and_gradients(family, kind, monkeypatch):
    """The flash-attention forward kernels that compile for TPU and GPU (kernels.flash_attention), run
    in Pallas's interpreters (the TPU one under pltpu.InterpretParams), against the reference: values
    and, through the blockwise backward fed by the kernel's lse, gradients. Blocks shrunk to the
    platform's minimum so 150 queries and keys span several blocks of each (and key blocks are skipped)."""
    monkeypatch.setattr(flash_attention, "TPU_ROWS", 64)  # 32 queries x 2 heads; keys: 128 (Mosaic's minimum)
    monkeypatch.setattr(flash_attention, "TPU_KEYS", 128)
    monkeypatch.setattr(flash_attention, "GPU_ROWS", 16)
    monkeypatch.setattr(flash_attention, "GPU_KEYS", 16)
    mask, length, keys, rows = masks(150)[kind]
    q, k, v = qkv(length, keys, seed=len(kind), g=2, d=16)
    p = flash_attention.plan(family, length, keys, 2)
    assert p.nk > 1 and (p.nq > 1 or kind == "cached")
    cot = jnp.asarray(np.random.RandomState(1).randn(*q.shape) * rows[:, :, None, None, None], jnp.float32)
    kernel = lambda q, k, v: pallas_attention(q, k, v, mask, family)  # noqa: E731
    reference = lambda q, k, v: reference_attention(q, k, v, mask)  # noqa: E731
    # float32 in another summation order (online softmax over key blocks): a few ulps, as the blockwise path
    np.testing.assert_allclose(np.asarray(kernel(q, k, v))[rows], np.asarray(reference(q, k, v))[rows], atol=2e-5,
                               rtol=2e-5)
    g_got = jax.grad(lambda q, k, v: jnp.sum(kernel(q, k, v) * cot), argnums=(0, 1, 2))(q, k, v)
    g_want = jax.grad(lambda q, k, v: jnp.sum(reference(q, k, v) * cot), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_got, g_want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=5e-5, err_msg=f"d{name}")


def test_pallas_kernel_in_bfloat16_and_through_the_model(monkeypatch):
    """bfloat16 inputs through the GPU kernel's body stay within bfloat16's resolution of the float32
    reference; and a Jamba forward with attention_impl='pallas' gives the blockwise path's logits."""
    import jamba_jax

    mask, length, keys, rows = masks(40)["causal"]
    q, k, v = qkv(length, keys, seed=3, g=2, d=16)
    got = pallas_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), mask, "gpu")
    assert got.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got, np.float32) - np.asarray(reference_attention(q, k, v, mask)))[rows]
    assert err.max() < 3e-2, err.max()  # as the blockwise path's bf16 test
    cfg = jamba_jax.JambaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, num_experts=1, num_experts_per_tok=1,
                                attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_dt_rank=4)
    params = jamba_jax.init_params(cfg, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 21), 0, 64)
    logits = {impl: jamba_jax.JambaForCausalLM(cfg.replace(attention_impl=impl)).apply({"params": params}, ids).logits
              for impl in ("blockwise", "pallas")}
    np.testing.assert_allclose(np.asarray(logits["pallas"]), np.asarray(logits["blockwise"]), atol=1e-5)


@pytest.mark.parametrize("new", [1, 2, 5, 6])  # rows new x G = 3, 6, 15: the one-pass merge; 18: attention()
def test_cached_attention_matches_the_reference_over_the_written_cache(new):
    """`new` tokens written at slot 7 of a 40-slot cache (row 0 left-padded by three, row 1's first new
    token a pad): the output is the reference's over the updated cache, the caches are the writes."""
    cache_len, index = 40, 7
    q, k_new, v_new = qkv(new, new, seed=new)
    _, k_cache, v_cache = qkv(1, cache_len, seed=10 + new)
    valid = np.zeros((B, cache_len), bool)
    valid[:, : index + new] = True
    valid[0, :3] = False
    valid[1, index] = False
    mask = AttentionMask.cached(jnp.asarray(valid), jnp.int32(index), new)
    out, k_got, v_got = jax.jit(cached_attention)(q, k_new, v_new, k_cache, v_cache, jnp.int32(index), mask)
    k_want = k_cache.at[:, :, index:index + new].set(k_new)
    v_want = v_cache.at[:, :, index:index + new].set(v_new)
    np.testing.assert_array_equal(np.asarray(k_got), np.asarray(k_want))
    np.testing.assert_array_equal(np.asarray(v_got), np.asarray(v_want))
    rows = valid[:, index:index + new]  # a pad query's output is read by nobody
    want = np.asarray(reference_attention(q, k_want, v_want, mask))
    np.testing.assert_allclose(np.asarray(out)[rows], want[rows], atol=2e-6)
    assert np.isfinite(np.asarray(out)).all()
    assert (new * G <= FEW_ROWS) == (new < 6)  # both paths are covered


def test_fully_masked_rows_are_finite():
    """A row with no visible key (a padded query, whose output nobody reads) gives a finite value
    (an average of v, as transformers' min-value masking does) and finite gradients, never NaN."""
    valid = np.ones((B, 10), bool)
    valid[1] = False
    q, k, v = qkv(10, 10)
    mask = AttentionMask.causal(jnp.asarray(valid))
    out, grads = jax.value_and_grad(lambda q, k, v: jnp.sum(blockwise_attention(q, k, v, mask, 4, 4) ** 2),
                                    argnums=(0, 1, 2))(q, k, v)
    assert np.isfinite(float(out)) and all(np.isfinite(np.asarray(g)).all() for g in grads)
    padded = np.asarray(blockwise_attention(q, k, v, mask, 4, 4))[1]
    assert np.isfinite(padded).all() and np.abs(padded).max() <= np.abs(np.asarray(v)).max()


def test_bfloat16_inputs_stay_close_to_the_float32_reference():
    """bfloat16 matmuls with float32 softmax and accumulation: within bfloat16's resolution."""
    mask, length, keys, rows = masks(40)["causal"]
    q, k, v = qkv(length, keys, seed=3)
    got = blockwise_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), mask, 16, 8)
    assert got.dtype == jnp.bfloat16
    want = reference_attention(q, k, v, mask)
    err = np.abs(np.asarray(got, np.float32) - np.asarray(want))[rows]
    assert err.max() < 3e-2, err.max()  # bf16 has 8 bits of mantissa: |x| ~ 1 values round by ~4e-3


def test_attention_dispatch():
    mask, length, keys, rows = masks(12)["causal"]
    q, k, v = qkv(length, keys)
    np.testing.assert_allclose(np.asarray(attention(q, k, v, mask, "auto"))[rows],
                               np.asarray(reference_attention(q, k, v, mask))[rows], atol=2e-5)
    with pytest.raises(ValueError, match="attention impl='dense'"):
        attention(q, k, v, mask, "dense")


@pytest.mark.parametrize("with_grad", [False, True])
def test_memory_is_linear_in_length(with_grad):
    """XLA's own buffer accounting for an 8192-token causal pass (one head, width 64): the scores
    alone would take 8192^2 x 4 B = 256 MiB; the blockwise program's temporaries stay a few MiB."""
    length = 8192
    q = jax.ShapeDtypeStruct((1, length, 1, 1, 64), jnp.float32)
    k = jax.ShapeDtypeStruct((1, 1, length, 64), jnp.float32)
    valid = jax.ShapeDtypeStruct((1, length), jnp.bool_)

    def fwd(q, k, v, valid):
        return blockwise_attention(q, k, v, AttentionMask.causal(valid))

    fn = jax.grad(lambda *a: jnp.sum(fwd(*a)), argnums=(0, 1, 2)) if with_grad else fwd
    stats = jax.jit(fn).lower(q, k, k, valid).compile().memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no memory analysis")
    scores = length * length * 4
    assert stats.temp_size_in_bytes < scores / 16, stats.temp_size_in_bytes
