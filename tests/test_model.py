"""Model behaviour beyond parity: logical axes, packing, remat, dtypes, traced bad ids."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jamba_jax
from jamba_jax.params import abstract_variables

CFG = jamba_jax.JambaConfig(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, num_experts=4, attn_layer_period=2,
                            attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=0, mamba_d_state=8)


@pytest.fixture(scope="module")
def params():
    p = jamba_jax.init_params(CFG, jax.random.PRNGKey(0))
    # perturb A_log/D/norms so that the checks below see every parameter's effect
    return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(1), x.shape), p)


def test_every_parameter_has_logical_axis_names():
    boxed = abstract_variables(CFG)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == len(leaf.value.shape), leaf


def test_packed_documents_do_not_see_each_other(params):
    """Changing one packed document changes no other document's logits (attention, conv and scan)."""
    model = jamba_jax.JambaForCausalLM(CFG)
    r = np.random.RandomState(0)
    ids = r.randint(3, CFG.vocab_size, (2, 24))
    seg = np.array([[1] * 7 + [2] * 10 + [3] * 5 + [0] * 2, [1] * 24])
    out = model.apply({"params": params}, ids, segment_ids=seg).logits
    changed = ids.copy()
    changed[0, 7:17] = r.randint(3, CFG.vocab_size, 10)  # rewrite document 2 of row 0
    out2 = model.apply({"params": params}, changed, segment_ids=seg).logits
    same = (seg[0] == 1) | (seg[0] == 3)
    np.testing.assert_allclose(np.asarray(out2[0])[same], np.asarray(out[0])[same], atol=1e-5, rtol=0)
    assert np.abs(np.asarray(out2[0])[seg[0] == 2] - np.asarray(out[0])[seg[0] == 2]).max() > 1e-3
    # and each document equals that document alone in its own row
    alone = model.apply({"params": params}, ids[:1, 17:22]).logits
    np.testing.assert_allclose(np.asarray(out[0, 17:22]), np.asarray(alone[0]), atol=1e-5, rtol=0)


@pytest.mark.slow  # about 90 s of compiles
def test_remat_changes_nothing(params):
    ids = np.random.RandomState(1).randint(3, CFG.vocab_size, (2, 9))

    def loss(cfg, p):
        return jnp.mean(jamba_jax.JambaForCausalLM(cfg).apply({"params": p}, ids).logits ** 2)

    l1, g1 = jax.value_and_grad(lambda p: loss(CFG, p))(params)
    l2, g2 = jax.value_and_grad(lambda p: loss(CFG.replace(remat_policy="full"), p))(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):  # remat recomputes in a different
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # fusion order: float32 rounding, not maths


def saved_bytes_and_names(cfg, params, ids):
    """What the backward pass keeps from the forward pass, as jax's autodiff sees it: (bytes, the checkpoint
    names among them)."""
    from jax._src.ad_checkpoint import saved_residuals

    res = saved_residuals(lambda p: jnp.sum(jamba_jax.JambaForCausalLM(cfg).apply({"params": p}, ids).logits), params)
    kept = [(a, src) for a, src in res if "from the argument" not in src]
    names = {"attention_core" for _, src in kept if "'attention_core'" in src}
    names |= {"moe_hidden" for _, src in kept if "grouped_matmul" in src}  # stacked by the blocked FFN's lax.map
    return sum(a.size * a.dtype.itemsize for a, _ in kept), names


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_keep_what_they_say(params, scan):
    """Each remat_policy (jamba_jax.remat), in both layouts: "full" keeps less than "save_dots" and the
    tagged-output policy, which keep less than "none"; the tagged policy keeps the attention's output and
    log-sum-exp and the experts' hidden activations; "full" none of them, "save_dots" not the attention's
    (checked by name in the unrolled stack). Tracing only (nothing compiles)."""
    from jamba_jax.layout import to_scanned

    ids = jnp.asarray(np.random.RandomState(1).randint(3, CFG.vocab_size, (2, 64)))
    base = CFG.replace(scan_layers=scan)
    p = to_scanned(CFG, params) if scan else params
    got = {policy: saved_bytes_and_names(base.replace(remat_policy=policy), p, ids)
           for policy in ("none", "full", "save_dots", "save_attention_and_moe_outputs")}
    assert got["full"][0] < got["save_attention_and_moe_outputs"][0] < got["none"][0]
    assert got["full"][0] < got["save_dots"][0] < got["none"][0]
    if not scan:  # (the scanned stack's residuals all come out of its scan, unnamed)
        assert got["save_attention_and_moe_outputs"][1] == {"attention_core", "moe_hidden"}
        assert not got["full"][1] and "attention_core" not in got["save_dots"][1]


def test_remat_policies_change_no_number(params):
    """The scanned stack (2 repeats of the 2-layer cycle, remat inside the scan with prevent_cse=False) gives
    the same loss and gradients under every policy as without remat."""
    from jamba_jax.layout import to_scanned

    ids = np.random.RandomState(1).randint(3, CFG.vocab_size, (2, 9))
    p = to_scanned(CFG, params)

    def loss(policy):
        model = jamba_jax.JambaForCausalLM(CFG.replace(scan_layers=True, remat_policy=policy))
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, ids).logits ** 2)))(p)

    l0, g0 = loss("none")
    for policy in ("full", "save_dots", "save_attention_and_moe_outputs"):
        l1, g1 = loss(policy)
        np.testing.assert_allclose(l1, l0, rtol=1e-6, err_msg=policy)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):  # recomputed in another fusion
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=policy)  # order: float32 rounding


@pytest.mark.slow  # about 45 s of compiles
def test_bfloat16_compute_is_close_to_float32(params):
    ids = np.random.RandomState(2).randint(3, CFG.vocab_size, (2, 16))
    ref = jamba_jax.JambaForCausalLM(CFG).apply({"params": params}, ids).logits
    out = jamba_jax.JambaForCausalLM(CFG.replace(dtype="bfloat16")).apply({"params": params}, ids).logits
    assert out.dtype == jnp.bfloat16
    out, ref = np.asarray(out, np.float32), np.asarray(ref)
    # bf16 keeps 8 bits of mantissa: typical errors are ~1% of the logits' scale; a few tokens may
    # route to a different expert (a near-tie flips), so the bound is on the mean, not the max.
    assert np.abs(out - ref).mean() <= 0.02 * np.abs(ref).mean()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_traced_bad_ids_poison_instead_of_clamping(params):
    fwd = jax.jit(lambda p, x: jamba_jax.JambaForCausalLM(CFG).apply({"params": p}, x).logits)
    ids = np.full((1, 4), 5)
    ids[0, 2] = CFG.vocab_size + 3
    out = np.asarray(fwd(params, ids))
    # NaN spreads through the row (attention mixes the bad key into every query's 0-weighted sum):
    # the row is visibly poisoned rather than silently computed from a clamped embedding.
    assert np.isnan(out[0, 2:]).all()


@pytest.mark.parametrize("num_experts, top_k, tokens", [(4, 2, 96), (16, 2, 40), (3, 3, 7)])
def test_blocked_dense_and_ragged_grouped_matmuls_agree(num_experts, top_k, tokens):
    """The CPU's blocked grouped matmul, the dense form for few tokens and jax.lax.ragged_dot give the
    same experts' outputs and gradients, including experts that receive no token."""
    from jamba_jax.moe import Experts

    cfg = CFG.replace(num_experts=num_experts, num_experts_per_tok=top_k)
    r = np.random.RandomState(num_experts)
    x = jnp.asarray(r.randn(tokens, cfg.hidden_size), jnp.float32)
    idx = jnp.asarray(np.stack([r.choice(num_experts - (num_experts > 3), top_k, replace=False)
                                for _ in range(tokens)]))  # the last expert of 4 and 16 gets nothing
    w = jnp.asarray(r.rand(tokens, top_k), jnp.float32)
    params = Experts(cfg, impl="ragged").init(jax.random.PRNGKey(0), x, idx, w)

    def run(impl):
        f = lambda p, x: Experts(cfg, impl=impl).apply(p, x, idx, w)  # noqa: E731
        y = f(params, x)
        g = jax.grad(lambda p, x: jnp.sum(jnp.sin(f(p, x))), argnums=(0, 1))(params, x)
        return y, g

    y_r, g_r = run("ragged")
    for impl in ("blocked", "dense"):
        y_b, g_b = run(impl)
        np.testing.assert_allclose(y_b, y_r, rtol=1e-5, atol=1e-6, err_msg=impl)
        for a, b in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_r), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=impl)


def test_expert_adapters_agree_across_implementations_and_equal_the_merged_weights():
    """LoRA adapters on the experts' three weights (jamba_jax.lora: A [X, in, r], B [X, r, out]): the ragged,
    blocked and dense forms give the same outputs and adapter gradients, and those of the experts with the
    merged weights W + A B."""
    from jamba_jax.moe import Experts

    cfg = CFG.replace(num_experts=4, num_experts_per_tok=2)
    r = np.random.RandomState(11)
    x = jnp.asarray(r.randn(24, cfg.hidden_size), jnp.float32)
    idx = jnp.asarray(np.stack([r.choice(4, 2, replace=False) for _ in range(24)]))
    w = jnp.asarray(r.rand(24, 2), jnp.float32)
    base = nn.unbox(Experts(cfg, impl="ragged").init(jax.random.PRNGKey(0), x, idx, w))["params"]
    adapters = {}
    for n in ("gate_proj", "up_proj", "down_proj"):
        _, d_in, out = base[n].shape
        adapters[f"{n}_lora_a"] = jnp.asarray(r.randn(4, d_in, 3) * 0.3, jnp.float32)
        adapters[f"{n}_lora_b"] = jnp.asarray(r.randn(4, 3, out) * 0.3, jnp.float32)
    merged = {n: base[n] + adapters[f"{n}_lora_a"] @ adapters[f"{n}_lora_b"] for n in base}
    want = Experts(cfg, impl="ragged").apply({"params": merged}, x, idx, w)
    grads = {}
    for impl in ("ragged", "blocked", "dense"):
        f = lambda a, impl=impl: Experts(cfg, impl=impl).apply({"params": {**base, **a}}, x, idx, w)  # noqa: E731
        np.testing.assert_allclose(f(adapters), want, rtol=1e-5, atol=1e-5, err_msg=impl)
        grads[impl] = jax.grad(lambda a, f=f: jnp.sum(jnp.sin(f(a))))(adapters)
        assert float(jnp.abs(grads[impl]["gate_proj_lora_b"]).max()) > 0
    for impl in ("blocked", "dense"):
        for k in adapters:
            np.testing.assert_allclose(grads[impl][k], grads["ragged"][k], rtol=1e-4, atol=1e-5, err_msg=f"{impl} {k}")


def test_dense_experts_for_few_tokens_skip_choices_of_no_expert():
    """The CPU runs few tokens (decoding) densely; a choice of expert id num_experts (an expert on
    another device) adds nothing there, as in the blocked form."""
    from jamba_jax.grouped_ffn import combine_local
    from jamba_jax.moe import Experts
    from kernels.grouped_matmul import ExpertWeight, expert_ffn_impl

    cfg = CFG.replace(num_experts=4, num_experts_per_tok=2)
    # dense while the rows beyond the chosen ones, tokens x (experts - top_k), stay within 512
    assert expert_ffn_impl("auto", 256, 4, 2) == "dense" and expert_ffn_impl("auto", 257, 4, 2) == "blocked"
    assert expert_ffn_impl("auto", 36, 16, 2) == "dense" and expert_ffn_impl("auto", 37, 16, 2) == "blocked"
    r = np.random.RandomState(2)
    x = jnp.asarray(r.randn(3, cfg.hidden_size), jnp.float32)
    idx = jnp.asarray([[0, 4], [4, 2], [1, 3]])
    w = jnp.asarray(r.rand(3, 2), jnp.float32)
    params = nn.unbox(Experts(cfg, impl="ragged").init(jax.random.PRNGKey(0), x, idx, w))["params"]
    weights = tuple(ExpertWeight(params[n]) for n in ("gate_proj", "up_proj", "down_proj"))
    got = combine_local(x, idx, w, weights, jax.nn.silu, impl="dense")
    want = combine_local(x, idx, w, weights, jax.nn.silu, impl="blocked")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    alone = combine_local(x[1:2], idx[1:2, 1:], w[1:2, 1:], weights, jax.nn.silu, impl="dense")
    np.testing.assert_allclose(got[1:2], alone, rtol=1e-5, atol=1e-6)


def test_capacity_factor_without_expert_parallelism_drops_overflow_pairs():
    """moe_capacity_factor on one device is applied, not ignored: each expert keeps its first
    ceil(factor x pairs / experts) (token, choice) pairs in token order, the rest add nothing."""
    from jamba_jax.moe import Experts

    cfg = CFG.replace(num_experts=4, num_experts_per_tok=2, moe_capacity_factor=0.5)
    r = np.random.RandomState(5)
    t, k, e = 16, 2, 4
    x = jnp.asarray(r.randn(t, cfg.hidden_size), jnp.float32)
    idx = jnp.asarray(np.stack([r.choice(e, k, replace=False) for _ in range(t)]))
    w = jnp.asarray(r.rand(t, k), jnp.float32)
    params = Experts(cfg).init(jax.random.PRNGKey(0), x, idx, w)
    got = np.asarray(Experts(cfg).apply(params, x, idx, w))
    dropless = np.asarray(Experts(cfg.replace(moe_capacity_factor=0.0)).apply(params, x, idx, w))

    cap = int(np.ceil(0.5 * t * k / e))  # 4 of the 8 pairs each expert gets on average
    kept = np.zeros((t, k), bool)
    seen = np.zeros(e, int)
    for i in range(t):  # token order, then choice order: the stable sort's order within an expert
        for j in range(k):
            ex = int(idx[i, j])
            kept[i, j] = seen[ex] < cap
            seen[ex] += 1
    want = np.asarray(Experts(cfg.replace(moe_capacity_factor=0.0)).apply(params, x, idx, w * kept))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert 0 < (~kept).sum() and not np.allclose(got, dropless)  # something was dropped


@pytest.mark.slow  # about 2 min; test_attention checks the blockwise values and gradients by default
def test_training_loss_and_gradients_do_not_depend_on_the_attention_blocks(params, monkeypatch):
    """A packed training batch's loss and parameter gradients with 4-query x 4-key attention blocks
    (many blocks, causal and segment skipping, the recomputing backward) equal those of one block."""
    import common.attention.blockwise as blockwise
    from jamba_jax.losses import next_token_loss

    model = jamba_jax.JambaForCausalLM(CFG)
    r = np.random.RandomState(3)
    ids = jnp.asarray(r.randint(3, CFG.vocab_size, (2, 24)))
    seg = jnp.asarray(np.array([[1] * 9 + [2] * 11 + [0] * 4, [1] * 24]))

    def loss(p):
        logits = model.apply({"params": p}, ids, segment_ids=seg).logits
        return next_token_loss(logits, ids, (seg != 0).astype(jnp.float32), seg)[0]

    one_block = jax.value_and_grad(loss)(params)
    monkeypatch.setattr(blockwise, "BLOCK_Q", 4)
    monkeypatch.setattr(blockwise, "BLOCK_K", 4)
    jax.clear_caches()
    many_blocks = jax.value_and_grad(loss)(params)
    jax.clear_caches()
    np.testing.assert_allclose(float(many_blocks[0]), float(one_block[0]), rtol=1e-6)
    # float32 sums in another order through 4 layers' backward: ulp-level differences, not a looser check
    for a, b in zip(jax.tree.leaves(many_blocks[1]), jax.tree.leaves(one_block[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_chunked_loss_equals_the_full_logits_loss():
    """chunked_token_nll over 3-position chunks (11 positions: the last chunk padded) gives the per-token
    losses of the full logits, and the same gradients for the hidden states and the head."""
    import common.losses as losses

    r = np.random.RandomState(7)
    h = jnp.asarray(r.randn(2, 11, 16), jnp.float32)
    head = jnp.asarray(r.randn(16, 97), jnp.float32)
    t = jnp.asarray(r.randint(0, 97, (2, 11)))
    w = jnp.asarray(r.rand(2, 11), jnp.float32)
    full = lambda h, head: jnp.sum(losses.token_nll(h @ head, t) * w)  # noqa: E731
    chunked = lambda h, head: jnp.sum(losses.chunked_token_nll(h, head, t, chunk_bytes=2 * 97 * 4 * 3) * w)  # noqa: E731
    np.testing.assert_allclose(losses.chunked_token_nll(h, head, t, chunk_bytes=2 * 97 * 4 * 3),
                               losses.token_nll(h @ head, t), rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.grad(chunked, argnums=(0, 1))(h, head), jax.grad(full, argnums=(0, 1))(h, head), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_token_nll_gives_the_losses_of_the_logits(params, monkeypatch, tied):
    """The `token_nll` entry point (chunked: 3 positions per chunk here) gives -log softmax(logits)[target]
    of the logits entry point, through the tied embedding or the separate head; `hidden` gives the hidden
    states and head whose product is the logits."""
    import common.losses as losses

    cfg = CFG.replace(tie_word_embeddings=tied)
    p = params if not tied else jamba_jax.init_params(cfg, jax.random.PRNGKey(4))
    model = jamba_jax.JambaForCausalLM(cfg)
    r = np.random.RandomState(7)
    ids = jnp.asarray(r.randint(3, cfg.vocab_size, (2, 11)))
    targets = jnp.asarray(r.randint(0, cfg.vocab_size, (2, 11)))
    monkeypatch.setattr(losses, "LOSS_CHUNK_BYTES", 2 * cfg.vocab_size * 4 * 3)
    out = model.apply({"params": p}, ids, targets, method="token_nll")
    assert isinstance(out, jamba_jax.LossOutput) and out.token_nll.shape == ids.shape
    logits = model.apply({"params": p}, ids).logits
    np.testing.assert_allclose(out.token_nll, losses.token_nll(logits, targets), rtol=1e-5, atol=1e-6)
    hidden = model.apply({"params": p}, ids, method="hidden")
    np.testing.assert_array_equal(hidden.hidden @ hidden.head, logits)


def test_chunked_loss_memory_does_not_grow_with_length():
    """XLA's buffer accounting for the loss and its gradient over 16384 and 65536 positions of an 8192-token
    vocabulary (logits alone: 512 MiB and 2 GiB): a chunk's working set (a few LOSS_CHUNK_BYTES of logits,
    their softmax and gradient) that the length leaves unchanged, plus the [length, width] hidden states."""
    from common.losses import LOSS_CHUNK_BYTES, chunked_token_nll

    width, vocab = 64, 8192

    def temp_bytes(length):
        h = jax.ShapeDtypeStruct((1, length, width), jnp.float32)
        head = jax.ShapeDtypeStruct((width, vocab), jnp.float32)
        t = jax.ShapeDtypeStruct((1, length), jnp.int32)
        grad = jax.grad(lambda h, w, t: jnp.sum(chunked_token_nll(h, w, t)), argnums=(0, 1))
        stats = jax.jit(grad).lower(h, head, t).compile().memory_analysis()
        if stats is None:
            pytest.skip("this backend reports no memory analysis")
        return stats.temp_size_in_bytes

    short, long = temp_bytes(16384), temp_bytes(65536)
    assert short < 5 * LOSS_CHUNK_BYTES, short
    assert long - short < 4 * (65536 - 16384) * width * 4, (short, long)  # a few [length, width] arrays more
