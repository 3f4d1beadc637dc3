"""Generation with the hybrid cache against the full forward pass and transformers' generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_hf_model, random_ids

import jamba_jax
from jamba_jax import GenerationError, TokenIdError
from jamba_jax.generation import decode_loop, decode_step, prefill


@pytest.fixture(scope="module")
def model_and_params(tmp_path_factory):
    hf_model, path = make_hf_model(tmp_path_factory.mktemp("gen"), seed=21)
    with torch.no_grad():  # peaky next-token distributions: greedy choices far from ties
        hf_model.lm_head.weight.mul_(20.0)
    hf_model.save_pretrained(path)
    cfg, params = jamba_jax.load_hf_checkpoint(path)
    return hf_model, jamba_jax.JambaForCausalLM(cfg), params


def padded_prompts(vocab):
    ids = random_ids((3, 11), vocab, seed=22)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :7] = 0
    ids[mask == 0] = 0
    return ids, mask


def test_cached_decode_matches_full_forward_at_every_position(model_and_params):
    _, model, params = model_and_params
    ids, mask = padded_prompts(model.cfg.vocab_size)
    full = model.apply({"params": params}, ids, attention_mask=mask).logits
    cache = jamba_jax.init_cache(model.cfg, ids.shape[0], ids.shape[1])
    step = jax.jit(lambda p, c, x, m: model.apply({"params": p}, x, c, attention_mask=m, method="prefill"))
    for t in range(ids.shape[1]):  # one token at a time through the cache
        out = step(params, cache, ids[:, t:t + 1], mask[:, t:t + 1])
        cache = out.cache
        real = mask[:, t].astype(bool)
        np.testing.assert_allclose(np.asarray(out.logits)[real], np.asarray(full[:, t])[real], atol=1e-4, rtol=0)
    # decode: one token per row (no mask: every new token is real) continues the same cache
    token = jnp.asarray(random_ids((ids.shape[0],), model.cfg.vocab_size, seed=23), jnp.int32)
    cache = jamba_jax.init_cache(model.cfg, ids.shape[0], ids.shape[1] + 1)
    cache = jax.jit(lambda p, c: model.apply({"params": p}, ids, c, attention_mask=mask, method="prefill"))(
        params, cache).cache
    out = jax.jit(lambda p, c, x: model.apply({"params": p}, x, c, method="decode"))(params, cache, token)
    full = model.apply({"params": params}, jnp.concatenate([ids, token[:, None]], 1),
                       attention_mask=np.concatenate([mask, np.ones_like(mask[:, :1])], 1)).logits
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(full[:, -1]), atol=1e-4, rtol=0)
    assert int(out.cache.index) == ids.shape[1] + 1


def test_scanned_layers_generate_the_same_tokens_from_a_stacked_cache(model_and_params):
    """scan_layers: the cache holds one entry per cycle position, stacked over the repeats, and
    chunked prefill + decoding give the unrolled model's tokens (same weights, restacked)."""
    from jamba_jax.layout import repeats, to_scanned

    _, model, params = model_and_params
    scfg = model.cfg.replace(scan_layers=True)
    smodel = jamba_jax.JambaForCausalLM(scfg)
    cache = jamba_jax.init_cache(scfg, 2, 16)
    assert isinstance(cache, jamba_jax.HybridCache) and len(cache.layers) == scfg.layer_cycle
    assert all(x.shape[0] == repeats(scfg) for x in jax.tree.leaves(cache.layers))
    ids, mask = padded_prompts(model.cfg.vocab_size)
    want = jamba_jax.generate(model, params, ids, attention_mask=mask, max_new_tokens=6, prefill_chunk=4)
    got = jamba_jax.generate(smodel, to_scanned(model.cfg, params), ids, attention_mask=mask, max_new_tokens=6,
                             prefill_chunk=4)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_chunked_prefill_equals_one_pass(model_and_params, chunk):
    _, model, params = model_and_params
    ids, mask = padded_prompts(model.cfg.vocab_size)
    logits_1, cache_1 = prefill(model, params, ids, mask, max_length=16)
    logits_c, cache_c = prefill(model, params, ids, mask, max_length=16, prefill_chunk=chunk)
    np.testing.assert_allclose(logits_c, logits_1, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(cache_c.valid, cache_1.valid)
    real = np.asarray(cache_1.valid)  # K/V of pad slots are never attended to; only real slots must agree
    for layer_c, layer_1 in zip(cache_c.layers, cache_1.layers, strict=True):
        for key in layer_1._fields:  # KVCache (k, v) or MambaCache (conv, ssm)
            a, b = np.asarray(getattr(layer_c, key), np.float32), np.asarray(getattr(layer_1, key), np.float32)
            if key in ("k", "v"):  # [B, H, S, D]
                a, b = np.swapaxes(a, 1, 2)[real], np.swapaxes(b, 1, 2)[real]
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=key)


@pytest.mark.parametrize("padded", [False, True])
def test_greedy_tokens_equal_transformers_generate(model_and_params, padded):
    hf_model, model, params = model_and_params
    cfg = model.cfg
    ids, mask = padded_prompts(cfg.vocab_size)
    if not padded:
        ids, mask = ids[:1], mask[:1]
    ours = jamba_jax.generate(model, params, ids, attention_mask=mask, max_new_tokens=32,
                              eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                   max_new_tokens=32, eos_token_id=cfg.eos_token_id,
                                   pad_token_id=cfg.pad_token_id)[:, ids.shape[1]:].numpy()
    expected = np.full_like(ours, cfg.pad_token_id)
    expected[:, :theirs.shape[1]] = theirs  # transformers stops early once every row has ended
    np.testing.assert_array_equal(ours, expected)
    assert len(set(ours[0].tolist())) > 3  # a real continuation, not one repeated token


def test_sampling_is_reproducible_with_a_fixed_rng(model_and_params):
    _, model, params = model_and_params
    ids, mask = padded_prompts(model.cfg.vocab_size)
    kw = dict(attention_mask=mask, max_new_tokens=12, temperature=1.5, top_k=20, top_p=0.9)
    a = jamba_jax.generate(model, params, ids, rng=jax.random.PRNGKey(1), **kw)
    b = jamba_jax.generate(model, params, ids, rng=jax.random.PRNGKey(1), **kw)
    c = jamba_jax.generate(model, params, ids, rng=jax.random.PRNGKey(2), **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_top_k_1_and_tiny_top_p_are_greedy(model_and_params):
    _, model, params = model_and_params
    ids = random_ids((2, 6), model.cfg.vocab_size, seed=23)
    greedy = jamba_jax.generate(model, params, ids, max_new_tokens=8)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        sampled = jamba_jax.generate(model, params, ids, max_new_tokens=8, temperature=1.0,
                                     rng=jax.random.PRNGKey(3), **kw)
        np.testing.assert_array_equal(sampled, greedy)


def test_eos_ends_a_row_and_pads_it(model_and_params):
    _, model, params = model_and_params
    ids = random_ids((2, 6), model.cfg.vocab_size, seed=24)
    free = jamba_jax.generate(model, params, ids, max_new_tokens=10)
    eos = int(free[0, 3])  # pretend the 4th token of row 0 is EOS
    out = jamba_jax.generate(model, params, ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    first = int(np.argmax(out[0] == eos))
    assert (out[0, first + 1:] == 0).all() and first <= 3
    np.testing.assert_array_equal(out[0, :first + 1], free[0, :first + 1])


def test_decode_steps_do_not_recompile(model_and_params):
    _, model, params = model_and_params
    ids = random_ids((2, 5), model.cfg.vocab_size, seed=25)
    jax.clear_caches()
    seen = []
    streamed = jamba_jax.generate(model, params, ids, max_new_tokens=8, callback=lambda s, t: seen.append(s))
    assert seen == list(range(8)) and decode_step._cache_size() == 1  # 8 streamed steps, one compilation
    looped = jamba_jax.generate(model, params, ids, max_new_tokens=8)
    jamba_jax.generate(model, params, ids[:, :4], max_new_tokens=8, max_length=13)  # same cache: same loop
    assert decode_loop._cache_size() == 1
    np.testing.assert_array_equal(looped, streamed)


def test_bad_generation_inputs_are_named(model_and_params):
    _, model, params = model_and_params
    ids = random_ids((1, 5), model.cfg.vocab_size, seed=26)
    with pytest.raises(GenerationError, match="exceeds the cache's max_length"):
        jamba_jax.generate(model, params, ids, max_new_tokens=10, max_length=12)
    with pytest.raises(GenerationError, match="non-empty"):
        jamba_jax.generate(model, params, np.zeros((1, 0), np.int32))
    with pytest.raises(GenerationError, match="top_p=1.5"):
        jamba_jax.generate(model, params, ids, top_p=1.5, temperature=1.0)
    with pytest.raises(GenerationError, match="top_p=0"):
        jamba_jax.generate(model, params, ids, top_p=0.0, temperature=1.0)
    bad = ids.copy()
    bad[0, 1] = model.cfg.vocab_size
    with pytest.raises(TokenIdError):
        jamba_jax.generate(model, params, bad)


def test_cache_bytes_match_the_jamba_paper():
    from configs import jamba_large, jamba_mini

    gib = 2**30
    for module, kv_gib in ((jamba_mini, 4), (jamba_large, 9)):
        cfg = jamba_jax.JambaConfig.from_dict(module.get_config().model.to_dict())
        b = jamba_jax.cache_bytes(cfg, batch=1, length=262144, dtype="bfloat16")
        assert b["kv"] == kv_gib * gib
        assert b["mamba"] < 100 * 2**20  # Mini 16 MB, Large 72 MB per sequence, whatever the length
    small = jamba_jax.JambaConfig(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2,
                                  attn_layer_offset=1, num_experts=4, mamba_d_state=8)
    cache = jamba_jax.init_cache(small, 2, 10, jnp.bfloat16)
    measured = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache.layers))
    assert measured == jamba_jax.cache_bytes(small, 2, 10, "bfloat16")["total"]


def test_generate_cli_streams_text_from_a_training_checkpoint(tmp_path, capsys):
    from test_training import small_config

    import tasks
    from configs import generate as generate_config

    workdir = str(tmp_path / "run")
    tasks.run(small_config(num_train_steps=3, save_every_steps=3, eval_every_steps=3), workdir)
    capsys.readouterr()
    config = generate_config.get_config()
    config.checkpoint, config.prompt, config.max_new_tokens = workdir, "dog:", 6
    out = tasks.run(config, str(tmp_path))
    printed = capsys.readouterr().out
    assert out.shape == (1, 6) and printed.startswith("dog:") and len(printed.strip()) > len("dog:")
    config.top_p, config.temperature = 1.5, 1.0  # a bad argument is named before anything is printed
    with pytest.raises(GenerationError, match="top_p=1.5"):
        tasks.run(config, str(tmp_path))
    assert capsys.readouterr().out == ""
    config.prompt, config.top_p = "", 0.0
    with pytest.raises(GenerationError, match="config.prompt is empty"):
        tasks.run(config, str(tmp_path))
    with pytest.raises(jamba_jax.CheckpointError, match="neither"):
        config.checkpoint, config.prompt = str(tmp_path / "empty"), "dog:"
        (tmp_path / "empty").mkdir()
        tasks.run(config, str(tmp_path))


@pytest.mark.slow  # about 70 s; test_attention covers the blockwise path by default
def test_long_context_attention_path_matches(model_and_params, monkeypatch):
    """With 2-query x 2-key blocks, the forward pass and cached prefill/decoding walk many blocks
    (skipping those past the current position or before the left padding) and give the one-block
    path's logits and tokens."""
    import common.attention.blockwise as blockwise

    _, model, params = model_and_params
    ids, mask = padded_prompts(model.cfg.vocab_size)
    one_block_logits = model.apply({"params": params}, ids, attention_mask=mask).logits
    one_block_tokens = jamba_jax.generate(model, params, ids, attention_mask=mask, max_new_tokens=8, prefill_chunk=4)
    monkeypatch.setattr(blockwise, "BLOCK_Q", 2)
    monkeypatch.setattr(blockwise, "BLOCK_K", 2)
    jax.clear_caches()
    block_logits = model.apply({"params": params}, ids, attention_mask=mask).logits
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(block_logits)[real], np.asarray(one_block_logits)[real], atol=1e-4, rtol=0)
    block_tokens = jamba_jax.generate(model, params, ids, attention_mask=mask, max_new_tokens=8, prefill_chunk=4)
    jax.clear_caches()
    np.testing.assert_array_equal(block_tokens, one_block_tokens)


def test_several_eos_ids(model_and_params):
    _, model, params = model_and_params
    ids = random_ids((1, 6), model.cfg.vocab_size, seed=27)
    free = jamba_jax.generate(model, params, ids, max_new_tokens=10)
    eos = [int(free[0, 2]), 96]  # a list, as config.json may give it
    out = jamba_jax.generate(model, params, ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(out[0, :3], free[0, :3])
    assert (out[0, 3:] == 0).all()


def test_default_prefill_chunk_fits_the_budget():
    """A power of two within [MIN, MAX] whose activations fit the budget; the whole prompt if shorter."""
    from jamba_jax.generation import MAX_PREFILL_CHUNK, MIN_PREFILL_CHUNK, default_prefill_chunk
    from jamba_jax.params import forward_bytes_per_token

    cfg = jamba_jax.JambaConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                                num_attention_heads=4, num_key_value_heads=2, num_experts=4)
    per_token = forward_bytes_per_token(cfg)
    assert per_token > 0
    for batch in (1, 4, 64):
        chunk = default_prefill_chunk(cfg, batch, 1 << 20, budget_bytes=64 * 2**20)
        assert chunk & (chunk - 1) == 0 and MIN_PREFILL_CHUNK <= chunk <= MAX_PREFILL_CHUNK
        assert chunk * batch * per_token <= 64 * 2**20 or chunk == MIN_PREFILL_CHUNK
        assert chunk == MAX_PREFILL_CHUNK or 2 * chunk * batch * per_token > 64 * 2**20
    assert default_prefill_chunk(cfg, 1, 100) == 100


def test_a_64k_prompt_prefills_in_memory_independent_of_its_length():
    """XLA's buffer accounting for one prefill chunk (the default chunk) of the tiny Jamba into a
    65536-slot cache: its temporaries stay within the activation budget and are those of a
    32768-slot cache to within the chunk's own scores, so a prompt's memory is the cache plus a
    constant (no [length, length] array, no activations for the whole prompt)."""
    import configs.jamba_tiny as tiny
    from jamba_jax.generation import PREFILL_BUDGET_BYTES, default_prefill_chunk, prefill_step

    cfg = jamba_jax.JambaConfig(**tiny.get_config().model.to_dict())
    model = jamba_jax.JambaForCausalLM(cfg)
    params = jax.eval_shape(lambda: jamba_jax.init_params(cfg, jax.random.PRNGKey(0)))
    chunk = default_prefill_chunk(cfg, 1, 65536)
    ids = jax.ShapeDtypeStruct((1, chunk), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, chunk), jnp.bool_)
    temp = {}
    for slots in (32768, 65536):
        cache = jax.eval_shape(lambda s=slots: model.init_cache(1, s))
        stats = prefill_step.lower(model, params, cache, ids, mask).compile().memory_analysis()
        if stats is None:
            pytest.skip("this backend reports no memory analysis")
        temp[slots] = stats.temp_size_in_bytes
    assert temp[65536] <= PREFILL_BUDGET_BYTES, temp
    assert temp[65536] - temp[32768] < 0.25 * PREFILL_BUDGET_BYTES, temp


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "int8"])
def test_a_decode_step_updates_the_cache_in_place(kv_dtype):
    """XLA's buffer accounting for one decode step of the tiny Jamba from a 16384-slot cache: its
    temporaries stay far below the KV cache, i.e. the step writes the new keys into the (donated) cache
    and reads it where it lies; a step that copied the cache (an update scheduled before the reads
    of the old cache, or fused into a reader) would need at least the cache again. (bf16, int8, 64K slots: bf16
    multiplied as it lies, int8 a chunk of keys and values converted at a time, never a float copy of the cache.)"""
    import configs.jamba_tiny as tiny

    cfg = jamba_jax.JambaConfig(**tiny.get_config().model.to_dict()).replace(kv_cache_dtype=kv_dtype)
    model = jamba_jax.JambaForCausalLM(cfg)
    params = jax.eval_shape(lambda: jamba_jax.init_params(cfg, jax.random.PRNGKey(0)))
    slots = 16384 if kv_dtype == "float32" else 65536  # int8: read in chunks of KV_CHUNK keys, whatever the length
    cache = jax.eval_shape(lambda: model.init_cache(2, slots))
    logits = jax.ShapeDtypeStruct((2, cfg.vocab_size), jnp.float32)
    done = jax.ShapeDtypeStruct((2,), jnp.bool_)
    stats = decode_step.lower(model, params, cache, logits, done, jax.random.PRNGKey(0), 0.0, None, None, None,
                               0).compile().memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no memory analysis")
    kv = jamba_jax.cache_bytes(cfg, 2, slots, kv_dtype)["kv"]  # a copy of the k or the v store: >= kv / 2
    assert stats.temp_size_in_bytes < kv / 4, (stats.temp_size_in_bytes, kv)


def test_kv_store_int8_round_trip_is_within_half_a_step():
    from common.attention import kv_store

    x = jnp.asarray(np.random.RandomState(3).randn(2, 3, 5, 16) * np.logspace(-3, 2, 5)[:, None], jnp.float32)
    x = x.at[0, 0, 0].set(0.0)  # a zero vector: scale 0, values 0
    q = kv_store.quantize(x)
    assert q.q.dtype == jnp.int8 and q.scale.shape == x.shape[:-1]
    step = np.abs(np.asarray(x)).max(-1, keepdims=True) / 127
    err = np.abs(np.asarray(kv_store.read(q, jnp.float32)) - np.asarray(x))
    assert (err <= step / 2 * (1 + 1e-5) + 1e-12).all() and (err[0, 0, 0] == 0).all()
    store = kv_store.write(kv_store.empty((2, 3, 8, 16), "int8"), x, 2)
    np.testing.assert_array_equal(store.q[:, :, 2:7], q.q)
    assert (store.scale[:, :, :2] == 0).all() and (store.scale[:, :, 7:] == 0).all()


@pytest.mark.parametrize("kv_dtype, tol", [("bfloat16", 2e-2), ("int8", 5e-2)])
def test_low_precision_kv_caches_stay_close_to_float32(model_and_params, kv_dtype, tol):
    """config.kv_cache_dtype: a padded batch prefilled then decoded 6 tokens (teacher-forced with the float32
    cache's greedy tokens) gives logits within `tol` of the float32 cache's, relative to their spread (bf16
    keeps 8 mantissa bits, int8 a step of |x|max / 127 per position and head), and the same greedy tokens;
    the cache holds what it says (int8 values with float32 scales) and `cache_bytes` counts it."""
    _, model, params = model_and_params
    ids, mask = padded_prompts(model.cfg.vocab_size)
    low = jamba_jax.JambaForCausalLM(model.cfg.replace(kv_cache_dtype=kv_dtype))

    def run(m):
        cache = m.init_cache(ids.shape[0], ids.shape[1] + 6)
        out = m.apply({"params": params}, ids, cache, attention_mask=mask, method="prefill")
        logits, cache = [out.logits], out.cache
        for _ in range(6):
            token = jnp.argmax(want[len(logits) - 1] if m is low else logits[-1], -1).astype(jnp.int32)
            out = m.apply({"params": params}, token, cache, method="decode")
            logits.append(out.logits)
            cache = out.cache
        return np.stack(logits), cache

    want = None
    want, _ = run(model)
    got, cache = run(low)
    leaves = jax.tree.leaves(cache.layers[model.cfg.attn_layer_offset])
    assert [x.dtype for x in leaves] == ([jnp.int8, jnp.float32] * 2 if kv_dtype == "int8" else [jnp.bfloat16] * 2)
    measured = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache.layers))
    assert measured == jamba_jax.cache_bytes(model.cfg, ids.shape[0], ids.shape[1] + 6, kv_dtype)["total"]
    err = np.abs(got - want).max() / want.std()
    assert 0 < err < tol, err
    assert (got.argmax(-1) == want.argmax(-1)).all()
