"""The continuous-batching engine (serving/): each request's tokens equal what `generate()` gives it alone,
under staggered arrivals, slot reuse, stop strings, cancellations and a soak of random requests, with
nothing compiled after the warm-up."""

import dataclasses
import gc
import json
import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jamba_jax
import serving.engine
from common.tokenizers import load_tokenizer
from jamba_jax.cache import HybridCache
from serving import Engine, EngineConfig, EngineConfigError, QueueFullError, RequestError, SamplingParams
from serving.sampling import sample_rows
from serving.slots import bucket, bucket_sizes

GREEDY = SamplingParams(temperature=0.0)
MAX_MODEL_LEN = 64  # the engines' (make_engine), and the cache of generate() alone


@pytest.fixture(scope="module")
def served(hf_dir):
    _, path = hf_dir
    cfg, params = jamba_jax.load_checkpoint(path)
    model = jamba_jax.JambaForCausalLM(cfg)
    return model, params, load_tokenizer(os.path.join(path, "tokenizer.json"), cfg.vocab_size)


def make_engine(served, **kw):
    model, params, tok = served
    # decode_steps 2: the warm-up compiles a decode program per call length (1 and 2 here, 1, 2, 4, 8 at 8)
    config = dict(max_num_seqs=3, max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=8, prefill_chunk=8,
                  decode_steps=2)
    engine = Engine(model, params, tok, EngineConfig(**{**config, **kw}), end_ids=[tok.eos_id])
    engine.warmup()
    return engine


def alone(served, prompt, n):
    """The tokens `generate()` gives the prompt alone, greedy, cut after the end token. The cache has the engines'
    max_model_len, as theirs: one shape for every prompt, so generate's programs compile once, not per length."""
    model, params, tok = served
    out = jamba_jax.generate(model, params, np.asarray([prompt]), max_new_tokens=n, eos_token_id=tok.eos_id,
                             prefill_chunk=1, max_length=MAX_MODEL_LEN)[0].tolist()
    return out[:out.index(tok.eos_id)] if tok.eos_id in out else out


def prompts(n, seed=0, longest=20):
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, 2048, size=int(rng.integers(0, longest))).tolist() for _ in range(n)]


def test_staggered_arrivals_give_each_request_the_tokens_of_generate_alone(served):
    engine = make_engine(served)
    before = serving.compilations()
    ps, lengths = prompts(7, seed=1), [5, 12, 3, 9, 16, 1, 7]
    requests = []
    for p, n in zip(ps, lengths, strict=True):  # a new request every other step, while others prefill or decode
        requests.append(engine.submit(p, dataclasses.replace(GREEDY, max_tokens=n, ignore_eos=True)))
        engine.step()
        engine.step()
    engine.run_until_idle()
    assert serving.compilations() == before  # the warm-up compiled every program the load needed
    for p, n, r in zip(ps, lengths, requests, strict=True):
        model, params, _ = served
        want = jamba_jax.generate(model, params, np.asarray([p]), max_new_tokens=n, prefill_chunk=1)[0].tolist()
        assert r.output_ids == want and r.finish_reason == "length"
    assert engine.idle and engine.slots == [None] * 3


def test_a_new_prompt_is_prefilled_beside_the_running_decode_call(served, monkeypatch):
    """A whole prompt that arrives while another request decodes is prefilled on the prefill thread while the
    step's decode call runs (that call starts before the prefill goes on); alone, a prompt is prefilled before
    its first decode call. Both requests get the tokens of generate() alone."""
    model, params, _ = served
    engine = make_engine(served, max_num_seqs=2, decode_steps=2)
    decode_started, seen = threading.Event(), []
    real_rows, real_decode = serving.engine.prefill_rows, serving.engine.decode_slots

    def rows(*args):
        seen.append((threading.current_thread().name, decode_started.wait(timeout=60 if seen else 0)))
        return real_rows(*args)

    def decode(*args):
        decode_started.set()
        return real_decode(*args)

    monkeypatch.setattr(serving.engine, "prefill_rows", rows)
    monkeypatch.setattr(serving.engine, "decode_slots", decode)
    ps = prompts(2, seed=11, longest=6)
    first = engine.submit(ps[0], dataclasses.replace(GREEDY, max_tokens=8, ignore_eos=True))
    engine.step()  # alone: prefilled, then its first decode call
    decode_started.clear()
    second = engine.submit(ps[1], dataclasses.replace(GREEDY, max_tokens=5, ignore_eos=True))
    engine.step()  # its prefill beside the first one's decode call
    engine.run_until_idle()
    assert seen == [("jamba-prefill_0", False), ("jamba-prefill_0", True)]
    for p, r in zip(ps, (first, second), strict=True):
        want = jamba_jax.generate(model, params, np.asarray([p]), max_new_tokens=r.sampling.max_tokens,
                                  prefill_chunk=1)[0].tolist()
        assert r.output_ids == want


def test_a_prompt_waiting_for_a_slot_is_prefilled_ahead_and_decodes_in_the_first_call_after_the_slot_frees(
        served, monkeypatch):
    """Two slots busy, a third request waits: its prompt is prefilled (staged) while the slots decode, and the
    step after the shorter request's last call puts it in that slot before the decode call: no call runs with
    a slot idle while it waits. Cancelled while staged, a request never takes a slot. Every request's tokens
    are generate()'s alone."""
    engine = make_engine(served, max_num_seqs=2, max_num_batched_tokens=32)  # decode_steps 2
    active, real = [], serving.engine.decode_slots
    monkeypatch.setattr(serving.engine, "decode_slots", lambda *a: active.append(np.asarray(a[4]).tolist()) or real(*a))
    a, b, c, d = prompts(4, seed=12, longest=6)
    long = engine.submit(a, dataclasses.replace(GREEDY, max_tokens=10, ignore_eos=True))
    short = engine.submit(b, dataclasses.replace(GREEDY, max_tokens=4, ignore_eos=True))
    third = engine.submit(c, dataclasses.replace(GREEDY, max_tokens=4, ignore_eos=True))
    engine.step()  # long and short: prefilled together, then their first call
    engine.step()  # third staged beside the second call (short's last: its slot is free)
    assert engine.staging.requests() == [third] and engine.slots.count(None) == 1
    engine.step()  # third placed, then the third call
    assert third in engine.slots and not engine.staging.requests()
    assert active == [[True, True]] * 3
    cancelled = engine.submit(d, dataclasses.replace(GREEDY, max_tokens=4, ignore_eos=True))
    engine.step()  # staged beside the fourth call
    assert engine.staging.requests() == [cancelled]
    engine.cancel(cancelled)
    engine.run_until_idle()
    assert cancelled.finish_reason == "cancelled" and cancelled.output_ids == [] and engine.idle
    for p, r in zip((a, b, c), (long, short, third), strict=True):
        assert r.output_ids == alone(served, p, r.sampling.max_tokens)


def test_a_reused_slot_starts_from_a_clean_state(served, monkeypatch):
    """One slot, two requests in turn: the second's tokens are its own, and its last logits are the full
    forward pass's over its prompt and output; they are not when the reset leaves the first request's Mamba
    states in the slot (so the test notices a missing reset). (A short prompt is prefilled in a group from a
    fresh state, which the staggered and soak tests cover.)"""
    model, params, _ = served
    rng = np.random.default_rng(2)  # prompts longer than a chunk: fed in pieces from the slot's own state
    first, second = ([1] + rng.integers(3, 2048, size=n).tolist() for n in (15, 13))

    def second_after_first():
        engine = make_engine(served, max_num_seqs=1)
        out = engine.generate([first, second], dataclasses.replace(GREEDY, max_tokens=12, ignore_eos=True))
        full = model.apply({"params": params}, np.asarray([second + out[1].output_ids]))
        return out[1].output_ids, np.abs(np.asarray(engine.logits[0]) - np.asarray(full.logits[0, -1])).max()

    tokens, gap = second_after_first()
    assert tokens == jamba_jax.generate(model, params, np.asarray([second]), max_new_tokens=12,
                                        prefill_chunk=1)[0].tolist()
    assert gap < 1e-4

    def keep_mamba_states(cfg, cache, slot):  # forgets the keys and the position only
        return HybridCache(cache.index.at[slot].set(0), cache.valid.at[slot].set(False), cache.layers)

    monkeypatch.setattr(serving.engine, "reset_slot", jax.jit(keep_mamba_states, static_argnums=0))
    assert second_after_first()[1] > 1e-3


def test_stop_strings_spanning_tokens_end_the_text_where_they_begin(served):
    _, _, tok = served
    prompt = prompts(1, seed=3)[0]
    ids = alone(served, prompt, 24)
    pieces = [tok.decode(ids[:i + 1]) for i in range(len(ids))]
    # a stop string made of the end of one token's text and the start of the next one's
    i = next(i for i in range(2, len(ids) - 1) if len(pieces[i]) - len(pieces[i - 1]) >= 2
             and len(pieces[i + 1]) - len(pieces[i]) >= 2 and pieces[i + 1].startswith(pieces[i]))
    stop = pieces[i][-2:] + pieces[i + 1][len(pieces[i]):len(pieces[i]) + 2]
    text = tok.decode(ids)
    at = text.find(stop)
    streamed = []
    engine = make_engine(served)
    r = engine.submit(prompt, dataclasses.replace(GREEDY, max_tokens=24, stop=(stop,)),
                      on_output=lambda _, out: streamed.append(out.text))
    engine.run_until_idle()
    assert r.finish_reason == "stop" and r.text == text[:at]
    assert "".join(streamed) == r.text  # the stream never showed a part of the stop string
    assert r.output_ids == ids[:len(r.output_ids)] and stop in tok.decode(r.output_ids)
    assert stop not in tok.decode(r.output_ids[:-1])  # it ended at the token that completed the stop string


def test_cancellation_frees_the_slot_for_the_next_request(served):
    engine = make_engine(served, max_num_seqs=1)
    first, second = prompts(2, seed=4)
    long = engine.submit(first, dataclasses.replace(GREEDY, max_tokens=48, ignore_eos=True))  # > 6 steps
    waiting = engine.submit(second, dataclasses.replace(GREEDY, max_tokens=10))
    for _ in range(6):
        engine.step()
    assert engine.slots[0] is long and len(long.output_ids) > 0
    engine.cancel(long)
    engine.step()
    assert long.finish_reason == "cancelled" and long.done.is_set() and engine.slots[0] is waiting
    engine.run_until_idle()
    assert waiting.output_ids == alone(served, second, 10)
    cancelled = engine.metrics.requests.labels("cancelled")._value.get()
    assert cancelled == 1 and engine.idle


def test_requests_that_cannot_run_are_refused_by_name(served):
    engine = make_engine(served, max_queue=2)
    with pytest.raises(RequestError, match="exceeds the model's context of 64") as e:
        engine.submit([1] * 60, SamplingParams(max_tokens=8))
    assert e.value.param == "max_tokens"
    for bad, param in [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                       (dict(max_tokens=0), "max_tokens"), (dict(stop=("",)), "stop")]:
        with pytest.raises(RequestError) as e:
            engine.submit([1, 5], SamplingParams(**bad))
        assert e.value.param == param
    with pytest.raises(RequestError, match="token ids"):
        engine.submit([1, 99999])
    engine.submit([1, 5])
    engine.submit([1, 6])
    with pytest.raises(QueueFullError):
        engine.submit([1, 7])


def test_slots_that_cannot_fit_the_device_are_refused_with_the_figures(served):
    model, params, tok = served
    with pytest.raises(EngineConfigError, match=r"max_num_seqs=4096 x max_model_len=1048576 needs about .* GiB"):
        Engine(model, params, tok, EngineConfig(max_num_seqs=4096, max_model_len=2**20))
    with pytest.raises(EngineConfigError, match="power of two"):
        Engine(model, params, tok, EngineConfig(prefill_chunk=48))
    with pytest.raises(EngineConfigError, match="cache_dtype='fp8' must be one of"):
        Engine(model, params, tok, EngineConfig(cache_dtype="fp8"))


def test_each_row_samples_with_its_own_settings():
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 50)) * 3
    greedy = np.asarray(jnp.argmax(logits, -1))
    sample = jax.jit(sample_rows)
    rows = lambda t, k, p, seed, step: np.asarray(sample(logits, jnp.asarray(t, jnp.float32), jnp.asarray(k),
                                                         jnp.asarray(p, jnp.float32), jnp.asarray(seed),
                                                         jnp.asarray(step)))
    zeros = [0, 0, 0, 0]
    # temperature 0, top_k 1 and a tiny top_p are all greedy; the seed fixes a row's draws
    assert (rows([0, 1, 1, 1], [0, 1, 0, 0], [1, 1, 1e-6, 1], zeros, zeros)[:3] == greedy[:3]).all()
    a = rows([1] * 4, zeros, [1] * 4, [7, 7, 8, 8], zeros)
    b = rows([1] * 4, zeros, [1] * 4, [7, 9, 8, 8], zeros)
    assert a[0] == b[0] and (a[2:] == b[2:]).all()  # a row's draw depends on its own seed only
    draws = np.stack([rows([1] * 4, [3] * 4, [1] * 4, zeros, [s] * 4) for s in range(40)])
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    assert all(set(draws[:, r]) <= set(top3[r]) for r in range(4)) and len(set(draws[:, 0])) > 1


def test_a_soak_of_random_requests_loses_nothing_and_returns_the_slots(served):
    """64 requests of random lengths arriving over time, some cancelled, some with stop strings: every
    request not cancelled has the tokens of generate() alone (cut where its stop string or end token
    ends it), every request ends once, and the slots, queue and device buffers come back to where they were."""
    _, _, tok = served
    engine = make_engine(served, max_num_seqs=4, max_num_batched_tokens=12)
    rng = np.random.default_rng(5)
    ps = prompts(64, seed=6)
    wants = [alone(served, p, 16) for p in ps]
    stops = [(tok.decode(w)[3:5],) if i % 5 == 0 and len(tok.decode(w)) > 6 else () for i, w in enumerate(wants)]
    endings = []
    requests = []
    gc.collect()
    buffers = len(jax.live_arrays())  # the device memory the engine holds before the load
    for i, p in enumerate(ps):
        params = dataclasses.replace(GREEDY, max_tokens=int(rng.integers(1, 17)), stop=stops[i])
        requests.append(engine.submit(p, params, on_output=lambda r, out: endings.append(r.id)
                                      if out.finish_reason else None))
        running = [r for r in requests if not r.finished]
        if i % 9 == 4 and running:  # a request still waiting or running
            engine.cancel(running[rng.integers(len(running))])
        for _ in range(int(rng.integers(0, 3))):
            engine.step()
    engine.run_until_idle()
    assert sorted(endings) == sorted(r.id for r in requests)  # each ended exactly once
    for r, want in zip(requests, wants, strict=True):
        if r.finish_reason == "cancelled":
            continue
        assert r.output_ids == want[:len(r.output_ids)]
        n = len(r.output_ids)
        if r.finish_reason == "length":
            assert n == r.sampling.max_tokens
        elif not r.sampling.stop or r.sampling.stop[0] not in tok.decode(want[:n]):
            assert n == len(want)  # the end token came next
    assert sum(r.finish_reason == "cancelled" for r in requests) >= 1
    assert engine.idle and engine.slots == [None] * 4 and not engine.waiting
    assert int(engine.metrics.running._value.get()) == 0
    gc.collect()
    assert len(jax.live_arrays()) == buffers  # ... and after it: nothing left behind


def test_the_engine_on_a_tensor_x_expert_mesh_plain_and_int8_equals_generate_on_one_device():
    """8 virtual devices (tensor 2 x expert 4): weights and KV heads sharded, each request's tokens those of
    generate() on one device, for float32 weights and for ExpertsInt8 weights with an int8 KV cache (its values
    and scales sharded over the KV heads), with no compilation after warm-up."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "tests", "serving_mesh_worker.py"), "--devices", "8",
                          "--mesh", json.dumps({"tensor": 2, "expert": 4})], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads([x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1][len("RESULT "):])
    for kind in ("plain", "int8"):
        r = result[kind]
        assert r["engine"] == r["alone"] and r["compilations"] == 0, kind
        assert r["devices"] == 8 and "tensor" in r["kv_sharding"]
        assert r["kv_dtype"] == r["expert_dtype"] == ("int8" if kind == "int8" else "float32"), r


def test_an_engine_bug_ends_the_requests_with_error_instead_of_hanging(served, monkeypatch):
    engine = make_engine(served)

    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr(engine, "_step", broken)
    engine.start()
    try:
        r = engine.submit([1, 5, 6], GREEDY)
        assert r.done.wait(30) and r.finish_reason == "error"
        with pytest.raises(serving.engine.EngineStoppedError, match="a bug"):
            engine.submit([1, 5, 6], GREEDY)
    finally:
        engine.stop(30)


def test_an_engine_bug_also_ends_a_request_whose_slot_was_released(served):
    engine = make_engine(served, max_num_seqs=1, decode_steps=4)
    r = engine.submit(prompts(1, seed=7, longest=6)[0], dataclasses.replace(GREEDY, max_tokens=6, ignore_eos=True))
    engine.step()
    engine.step()  # its last call dispatched: the slot is free, its tokens still in flight
    assert engine.slots == [None] and not r.finished
    engine._fail(RuntimeError("a bug"))
    assert r.done.is_set() and r.finish_reason == "error"


def test_incremental_text_equals_decoding_the_whole_output():
    """A request's text, built token by token (and what it streamed), equals the tokenizer's decoding of all its
    tokens: random ids (partial UTF-8 characters included) and a text with accents, CJK and an emoji."""
    from serving.request import Request

    tok = load_tokenizer("", 2048)
    rng = np.random.default_rng(7)
    text = "dog: a domestic animal; Café naïve — “quotes” 東京 😀 end"
    for ids in [rng.integers(3, tok.vocab_size, size=int(rng.integers(1, 60))).tolist() for _ in range(100)] + [
            tok.encode(text)]:
        r = Request("r", [1], SamplingParams(max_tokens=len(ids), ignore_eos=True))
        streamed = "".join(r.add_token(t, frozenset(), tok.decode).text for t in ids)
        assert r.finished and r.text == tok.decode(ids) and streamed == r.text


def test_a_slot_is_refilled_as_soon_as_its_last_tokens_are_asked_for(served):
    """max_tokens known: the step that dispatches a request's last decode call frees its slot, and the next
    step puts the next request there while the first one's tokens are still on their way (no call with the
    slot idle); both get their own tokens. A request cancelled in that window still ends as cancelled."""
    engine = make_engine(served, max_num_seqs=1, decode_steps=4)
    a, b, c = prompts(3, seed=5, longest=6)  # each prefilled whole in one step
    first = engine.submit(a, dataclasses.replace(GREEDY, max_tokens=6, ignore_eos=True))
    second = engine.submit(b, dataclasses.replace(GREEDY, max_tokens=4, ignore_eos=True))
    third = engine.submit(c, dataclasses.replace(GREEDY, max_tokens=4, ignore_eos=True))
    engine.step()  # first: prefilled, tokens 1-4 asked for
    assert engine.slots[0] is first
    engine.step()  # first: tokens 5-6 asked for (its last call): the slot is free
    assert engine.slots[0] is None and not first.finished
    engine.step()  # second placed and its 4 tokens asked for; first's last tokens collected
    assert first.finished and len(first.output_ids) == 6 and not second.finished
    engine.cancel(second)  # after its slot went to the third request, before its tokens arrived
    engine.run_until_idle()
    assert second.finish_reason == "cancelled" and second.done.is_set()
    assert first.output_ids == alone(served, a, 6) and third.output_ids == alone(served, c, 4)
    assert engine.idle and engine.slots == [None]


def test_while_requests_wait_a_decode_call_ends_where_a_slot_frees(served, monkeypatch):
    """With a request waiting, a call is cut to the longest compiled length (powers of two, and decode_steps)
    within the first slot's remaining max_tokens, so the slot is refilled at once instead of idling to the end
    of a full call; with none waiting, calls keep decode_steps. Tokens are generate()'s either way."""
    engine = make_engine(served, max_num_seqs=1, decode_steps=4)
    lengths, real = [], serving.engine.decode_slots
    monkeypatch.setattr(serving.engine, "decode_slots", lambda *a: lengths.append(a[11]) or real(*a))
    a, b = prompts(2, seed=8, longest=6)
    first = engine.submit(a, dataclasses.replace(GREEDY, max_tokens=7, ignore_eos=True))
    second = engine.submit(b, dataclasses.replace(GREEDY, max_tokens=3, ignore_eos=True))
    engine.run_until_idle()
    assert lengths == [4, 2, 1, 4]  # first: 7 = 4 + 2 + 1 while the second waits; the second alone: one call
    assert first.output_ids == alone(served, a, 7) and second.output_ids == alone(served, b, 3)


def test_prompts_padded_to_three_quarter_buckets_give_the_tokens_of_generate_alone(served):
    assert [bucket(n) for n in (1, 8, 9, 12, 13, 16, 17, 24, 25, 33, 49, 65, 97)] == [
        8, 8, 12, 12, 16, 16, 24, 24, 32, 48, 64, 96, 128]
    assert bucket_sizes(32) == [8, 12, 16, 24, 32]
    engine = make_engine(served, max_num_seqs=2, prefill_chunk=16, max_num_batched_tokens=16)
    rng = np.random.default_rng(6)
    ps = [[1] + rng.integers(3, 2048, size=n - 1).tolist() for n in (9, 12, 14)]  # buckets 12, 12, 16
    requests = engine.generate(ps, dataclasses.replace(GREEDY, max_tokens=5, ignore_eos=True))
    assert [r.output_ids for r in requests] == [alone(served, p, 5) for p in ps]
