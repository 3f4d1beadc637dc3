"""The OpenAI-compatible server, through the official `openai` client and plain HTTP: completions and chat
(streaming or not) equal generate()'s tokens, concurrent clients, every error status, a client gone
mid-stream, /metrics, and SIGTERM draining the open requests. Each server listens on 127.0.0.1 on a free
port and is stopped by its fixture or test whatever happens."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import jamba_jax
from common.tokenizers import load_tokenizer
from serving import Engine, EngineConfig
from serving.server import ServerThread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(hf_dir):
    _, path = hf_dir
    cfg, params = jamba_jax.load_checkpoint(path)
    model, tok = jamba_jax.JambaForCausalLM(cfg), load_tokenizer(os.path.join(path, "tokenizer.json"), cfg.vocab_size)
    engine = Engine(model, params, tok, EngineConfig(max_num_seqs=4, max_model_len=96, max_num_batched_tokens=16,
                                                     prefill_chunk=16, decode_steps=2), end_ids=[tok.eos_id])
    engine.warmup()
    with ServerThread(engine, model_name="tiny-jamba") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=60)
        yield server, client, model, params, tok


def reference(setup, ids, n):
    """The text generate() gives the prompt ids alone (greedy, to the end token), and its token count (a cache of
    the engine's max_model_len: one program for every prompt length)."""
    server, _, model, params, tok = setup
    out = jamba_jax.generate(model, params, np.asarray([ids]), max_new_tokens=n, eos_token_id=tok.eos_id,
                             prefill_chunk=1, max_length=server.engine.config.max_model_len)[0].tolist()
    out = out[:out.index(tok.eos_id)] if tok.eos_id in out else out
    return tok.decode(out), len(out)


def text_prompt_ids(tok, text):
    return [tok.bos_id] + tok.encode(text)


def test_completions_equal_generate_streaming_or_not(setup):
    _, client, _, _, tok = setup
    want, n = reference(setup, text_prompt_ids(tok, "dog: a domestic"), 12)
    r = client.completions.create(model="tiny-jamba", prompt="dog: a domestic", max_tokens=12, temperature=0)
    assert r.choices[0].text == want and r.object == "text_completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(text_prompt_ids(tok, "dog: a domestic")), n)
    chunks = list(client.completions.create(model="tiny-jamba", prompt="dog: a domestic", max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens == n
    ids = client.completions.create(model="tiny-jamba", prompt=[1, 40, 50], max_tokens=5, temperature=0)
    assert ids.choices[0].text == reference(setup, [1, 40, 50], 5)[0]


def test_chat_uses_the_checkpoints_template(setup):
    _, client, _, _, tok = setup
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Define dog."}]
    want, n = reference(setup, tok.encode_chat(messages, add_generation_prompt=True)[0], 16)
    r = client.chat.completions.create(model="tiny-jamba", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == n
    stream = client.chat.completions.create(model="tiny-jamba", messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n


def test_concurrent_clients_each_get_their_own_answer(setup):
    _, client, _, _, tok = setup
    texts = [f"{w}: a" for w in ("cat", "tree", "run", "blue", "house", "river", "stone")]
    wants = [reference(setup, text_prompt_ids(tok, t), 10)[0] for t in texts]
    got = [None] * len(texts)

    def ask(i):
        try:
            got[i] = client.completions.create(model="tiny-jamba", prompt=texts[i], max_tokens=10,
                                               temperature=0).choices[0].text
        except Exception as e:  # (shown by the assertion: a thread's traceback is easily lost in the output)
            got[i] = repr(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [t.is_alive() for t in threads] == [False] * len(texts)
    assert got == wants


def test_errors_are_openai_error_bodies(setup):
    server, client, _, _, _ = setup
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-jamba", prompt="x", temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context of 96"):
        client.completions.create(model="tiny-jamba", prompt="word " * 60, max_tokens=40)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-jamba", prompt="x", n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-jamba", prompt="x", max_tokens="many")
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    engine = server.engine
    config = engine.config
    try:
        engine.config = dataclasses.replace(config, max_queue=0)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="tiny-jamba", prompt="x")
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
    finally:
        engine.config = config


def test_a_client_gone_mid_stream_frees_its_slot(setup):
    server, _, _, _, _ = setup
    engine = server.engine
    before = engine.metrics.requests.labels("cancelled")._value.get()
    body = {"model": "tiny-jamba", "prompt": "dog:", "max_tokens": 80, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.base_url + "/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the request is running; then the client leaves
    deadline = time.monotonic() + 10
    while not (engine.idle and engine.metrics.requests.labels("cancelled")._value.get() == before + 1):
        assert time.monotonic() < deadline, "the abandoned request still holds its slot"
        time.sleep(0.05)


def test_models_health_and_metrics(setup):
    server, client, _, _, _ = setup
    assert [m.id for m in client.models.list().data] == ["tiny-jamba"]
    root = server.base_url[:-len("/v1")]
    assert httpx.get(root + "/health").json() == {"status": "ok"}
    client.completions.create(model="tiny-jamba", prompt="cat:", max_tokens=3, temperature=0)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(root + "/metrics").text)}
    for name in ("jamba_requests", "jamba_queue_length", "jamba_running_slots", "jamba_prompt_tokens",
                 "jamba_generation_tokens", "jamba_time_to_first_token_seconds", "jamba_inter_token_latency_seconds"):
        assert name in families, name
    generated = next(s.value for s in families["jamba_generation_tokens"].samples if s.name.endswith("_total"))
    ttft = next(s.value for s in families["jamba_time_to_first_token_seconds"].samples if s.name.endswith("_count"))
    assert generated >= 3 and ttft >= 1


def test_sigterm_lets_open_requests_finish(hf_dir, tmp_path):
    """`main.py --config=configs/serve.py` on a free port: a streaming request started before SIGTERM runs
    to its end, then the server exits with status 0."""
    _, path = hf_dir
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/serve.py", f"--config.checkpoint={path}",
           "--config.port=0", "--config.max_model_len=128", "--config.max_num_seqs=2", "--config.prefill_chunk=16",
           "--config.model_name=m"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the server exited at start-up"
        base = re.search(r"(http://\S+?/v1)", line).group(1)
        body = {"model": "m", "prompt": "dog:", "max_tokens": 60, "temperature": 0, "stream": True,
                "ignore_eos": True}
        events = []
        with httpx.stream("POST", base + "/completions", json=body, timeout=60) as r:
            for text in r.iter_lines():
                if text.startswith("data: ") and not events:
                    proc.send_signal(signal.SIGTERM)
                events.append(text)
        finals = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
        assert [e for e in events if e][-1] == "data: [DONE]"
        assert finals[-1]["choices"][0]["finish_reason"] == "length" and finals[-1]["usage"]["completion_tokens"] == 60
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


def test_bad_serving_settings_fail_in_one_line(hf_dir):
    _, path = hf_dir
    out = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/serve.py",
                          f"--config.checkpoint={path}", "--config.max_num_seqs=100000",
                          "--config.max_model_len=1000000"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: max_num_seqs=100000 x max_model_len=1000000 needs")
