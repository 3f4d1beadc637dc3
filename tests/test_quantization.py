"""ExpertsInt8: quantisation error bounds, model outputs, the int8 matmul kernels, loading and
saving quantised checkpoints, and the bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_hf_model, random_ids

import jamba_jax
from jamba_jax.orbax_io import load_params, save_params
from jamba_jax.quantization import QuantizationError, check_quantized, dequantize_int8, quantize_int8, weight_bytes
from kernels.int8_matmul import int8_matmul, int8_matmul_reference, pallas_gpu, pallas_tpu


@pytest.fixture(scope="module")
def peaky(tmp_path_factory):
    """A random small model with sharp next-token distributions, and its quantised params."""
    hf_model, path = make_hf_model(tmp_path_factory.mktemp("q"), seed=31)
    with torch.no_grad():
        hf_model.lm_head.weight.mul_(20.0)
    hf_model.save_pretrained(path)
    cfg, params = jamba_jax.load_hf_checkpoint(path)
    return path, cfg, params, jamba_jax.quantize_experts_int8(cfg, params)


def test_round_trip_error_is_at_most_half_a_step():
    w = jnp.asarray(np.random.RandomState(0).randn(3, 64, 40) * np.linspace(0.01, 3, 40), jnp.float32)
    q, scale = quantize_int8(w)
    assert q.dtype == jnp.int8 and scale.shape == (3, 40) and int(jnp.abs(q).max()) == 127
    err = jnp.abs(dequantize_int8(q, scale) - w)
    assert bool((err <= scale[:, None, :] / 2 + 1e-7).all())


def test_only_experts_and_mlp_weights_are_quantised(peaky):
    _, cfg, params, qparams = peaky
    check_quantized(cfg, qparams)
    flat = {"/".join(map(str, k)): v for k, v in jax.tree_util.tree_flatten_with_path(qparams)[0]}
    int8 = {k for k, v in flat.items() if v.dtype == jnp.int8}
    assert int8 and all("feed_forward" in k and "router" not in k for k in int8)
    flat_orig = {"/".join(map(str, k)): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for k, v in flat_orig.items():  # router, attention, Mamba, norms, embeddings untouched
        if k not in int8:
            np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(v))


def test_quantised_logits_stay_close_and_keep_the_argmax(peaky):
    _, cfg, params, qparams = peaky
    model = jamba_jax.JambaForCausalLM(cfg)
    ids = random_ids((4, 24), cfg.vocab_size, seed=32)
    ref = np.asarray(model.apply({"params": params}, ids).logits)
    out = np.asarray(model.apply({"params": qparams}, ids).logits)
    # int8 with per-channel scales keeps each weight within 0.4% of its channel's range: the logits
    # move by about 1% of their scale; a rare token may switch expert (a near-tie in the router).
    assert np.abs(out - ref).mean() <= 0.02 * np.abs(ref).mean()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


@pytest.mark.slow  # about 45 s; scanned layouts are checked against unrolled ones in test_parity by default
def test_quantisation_in_the_scanned_layout_equals_the_unrolled_one(peaky):
    """Stacked [repeats, experts, ...] weights quantise per (repeat, expert, channel): the same
    int8 values and scales as layer by layer, the same logits, also when quantised while loading."""
    from jamba_jax.layout import to_scanned

    path, cfg, params, qparams = peaky
    scfg = cfg.replace(scan_layers=True)
    sq = jamba_jax.quantize_experts_int8(scfg, to_scanned(cfg, params))
    for a, b in zip(jax.tree.leaves(sq), jax.tree.leaves(to_scanned(cfg, qparams)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, loaded = jamba_jax.load_hf_checkpoint(path, quantize="experts_int8", scan_layers=True)
    assert jax.tree.structure(loaded) == jax.tree.structure(sq)
    ids = random_ids((2, 10), cfg.vocab_size, seed=34)
    out = jamba_jax.JambaForCausalLM(scfg).apply({"params": sq}, ids).logits
    ref = jamba_jax.JambaForCausalLM(cfg).apply({"params": qparams}, ids).logits
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


def test_generation_runs_on_quantised_params(peaky):
    _, cfg, params, qparams = peaky
    model = jamba_jax.JambaForCausalLM(cfg)
    ids = random_ids((2, 8), cfg.vocab_size, seed=33)
    a = jamba_jax.generate(model, params, ids, max_new_tokens=12)
    b = jamba_jax.generate(model, qparams, ids, max_new_tokens=12)
    assert (a == b).mean() >= 0.75  # greedy paths agree for most tokens before any divergence


@pytest.mark.parametrize("m, k, n", [(5, 32, 24), (130, 16, 200), (37, 300, 260)])
def test_int8_matmul_kernels_equal_the_reference(m, k, n):
    """Each implementation, the TPU kernel under the TPU interpreter and the GPU kernel under
    Pallas's, with the blocks the platforms compile and with small blocks (several K steps, padded
    M, N and K), in float32 and bfloat16."""
    r = np.random.RandomState(m)
    x = jnp.asarray(r.randn(m, k), jnp.float32)
    q, s = quantize_int8(jnp.asarray(r.randn(k, n), jnp.float32))
    want = int8_matmul_reference(x, q, s)
    # float32 sums of k products in another order (scale after the sum, K in blocks): a few ulps of
    # the output's scale
    atol = 1e-6 * float(np.abs(want).max())
    for impl in ("xla", "pallas", "pallas_tpu", "pallas_gpu"):
        np.testing.assert_allclose(int8_matmul(x, q, s, impl=impl), want, rtol=1e-5, atol=atol, err_msg=impl)
    small = {"pallas_tpu": lambda a: pallas_tpu(*a, interpret=True, blocks=(32, 128, 128)),
             "pallas_gpu": lambda a: pallas_gpu(*a, interpret=True, blocks=(16, 32, 16))}
    for name, fn in small.items():
        np.testing.assert_allclose(fn((x, q, s)), want, rtol=1e-5, atol=atol, err_msg=f"{name} small blocks")
    xb = x.astype(jnp.bfloat16)
    want_b = int8_matmul_reference(xb, q, s).astype(np.float32)
    for impl in ("pallas_tpu", "pallas_gpu"):
        out = int8_matmul(xb, q, s, impl=impl)
        assert out.dtype == jnp.bfloat16  # activations stay in the compute dtype
        # bf16 output rounding (2^-8 relative) of sums of k terms of size ~1
        np.testing.assert_allclose(np.asarray(out, np.float32), want_b, rtol=2e-2, atol=2e-2, err_msg=impl)


def test_quantise_while_loading_equals_quantise_after(peaky):
    path, cfg, _, qparams = peaky
    _, loaded = jamba_jax.load_hf_checkpoint(path, quantize="experts_int8")
    assert jax.tree.structure(loaded) == jax.tree.structure(qparams)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(qparams), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype
        if a.dtype == np.int8:  # numpy (while loading) and XLA may round a scale 1 ulp apart
            assert np.abs(a.astype(int) - b).max() <= 1 and (a == b).mean() > 0.999
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)


def test_quantised_orbax_checkpoint_round_trip(peaky, tmp_path):
    _, cfg, _, qparams = peaky
    save_params(cfg, qparams, str(tmp_path / "q"))
    cfg2, again = load_params(str(tmp_path / "q"))
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(qparams), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_inputs_are_named(peaky):
    _, cfg, params, qparams = peaky
    with pytest.raises(QuantizationError, match="already int8"):
        jamba_jax.quantize_experts_int8(cfg, qparams)
    dense = cfg.replace(num_experts=1, num_experts_per_tok=1)
    with pytest.raises(QuantizationError, match="no mixture-of-experts layer"):
        jamba_jax.quantize_experts_int8(dense, jamba_jax.init_params(dense, jax.random.PRNGKey(0)))
    broken = jax.tree.map(lambda x: x, qparams)
    experts = broken["model"]["layers_0"]["feed_forward"]["experts"]
    experts["gate_proj_scale"] = experts["gate_proj_scale"][:, :-1]
    with pytest.raises(QuantizationError, match="gate_proj: scale shape"):
        check_quantized(cfg, broken)


def test_memory_report_for_jamba_1_5():
    from configs import jamba_large, jamba_mini

    for module in (jamba_mini, jamba_large):
        cfg = jamba_jax.JambaConfig.from_dict(module.get_config().model.to_dict())
        b = weight_bytes(cfg, "bfloat16")
        assert b["experts_int8"] <= 0.52 * b["experts_baseline"]
    large = jamba_jax.JambaConfig.from_dict(jamba_large.get_config().model.to_dict())
    b = weight_bytes(large, "bfloat16")
    kv = jamba_jax.cache_bytes(large, 1, 262144, "bfloat16")["total"]
    assert b["baseline"] > 8 * 80e9  # bf16 Large does not fit 8 x 80 GB at all ...
    assert b["int8"] + kv < 8 * 80e9  # ... ExpertsInt8 plus a 256K KV cache does (the paper's claim)
