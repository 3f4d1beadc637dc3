"""Serving throughput and latency: the OpenAI-compatible server (continuous batching) against static batches
of `generate()` and transformers' `generate` one request at a time, on the 11.6M benchmark Jamba.

N requests with prompt and output lengths drawn from one fixed distribution (seeded) are sent over HTTP with
the official `openai` client (async, streaming) to `python main.py --config=configs/serve.py` in its own
process, arriving as a Poisson process at several rates and all at once. Reported per load: output tokens/s,
requests/s, time to first token and inter-token latency (p50 / p99), and the server's XLA compilations during
the load (its /metrics). The peers run the same requests (greedy, every request to its drawn length):
generate() in static batches of max_num_seqs in arrival order, each batch waiting for its longest, and
transformers one at a time. Writes benchmarks/figures/serving.png and its BENCHMARKS.md section.

  python -m benchmarks.serving [--requests 64] [--slots 8] [--rates 2 4 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

from benchmarks.common import ROOT, machine, write_section  # noqa: E402

TOKENIZER_DIR = os.path.join(ROOT, "data", "tokenizer")
FIGURE = os.path.join(ROOT, "benchmarks", "figures", "serving.png")
MAX_MODEL_LEN = 512


def workload(n: int, seed: int = 0, vocab: int = 2048):
    """(prompts as token ids, output lengths): prompts uniform in [8, 96] tokens; outputs long-tailed as chat
    replies are (log-normal, median 48, clipped to [4, 384])."""
    rng = np.random.default_rng(seed)
    prompts = [[1] + rng.integers(3, vocab, size=int(rng.integers(7, 96))).tolist() for _ in range(n)]
    outputs = np.clip(np.round(np.exp(rng.normal(np.log(48), 0.9, n))), 4, 384).astype(int).tolist()
    return prompts, outputs


def save_checkpoint(directory: str):
    """The benchmark model (transformers' JambaForCausalLM, torch seed 0) saved with the bundled tokenizer;
    returns the transformers model."""
    from benchmarks.common import tiny_models

    hf, _, _ = tiny_models("bench")
    hf.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(TOKENIZER_DIR, name), os.path.join(directory, name))
    return hf


class Server:
    """`main.py --config=configs/serve.py` on a free port, stopped (SIGTERM) on exit."""

    def __init__(self, checkpoint: str, slots: int, decode_steps: int):
        cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/serve.py",
               f"--config.checkpoint={checkpoint}", "--config.port=0", f"--config.max_num_seqs={slots}",
               f"--config.max_model_len={MAX_MODEL_LEN}", "--config.max_num_batched_tokens=512",
               "--config.prefill_chunk=128", f"--config.decode_steps={decode_steps}", "--config.model_name=bench"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = ""
        while "serving" not in line:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError("the server did not start")
        self.startup = line.strip()
        self.base_url = re.search(r"(http://\S+?/v1)", line).group(1)

    def compilations(self) -> int:
        import httpx

        text = httpx.get(self.base_url[:-3] + "/metrics").text
        return int(float(re.search(r"^jamba_xla_compilations (\S+)$", text, re.M).group(1)))

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.proc.stdout.close()


async def _one(client, prompt, n, delay, start):
    await asyncio.sleep(max(delay - (time.perf_counter() - start), 0))
    sent = time.perf_counter()
    times = []
    usage = None
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=n, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        usage = chunk.usage or usage
    return sent, times, usage.completion_tokens


async def _load(base_url, prompts, outputs, rate, seed):
    import httpx
    import openai

    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, len(prompts)) if rate else np.zeros(len(prompts))
    arrivals = np.cumsum(gaps) - gaps[0]
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=len(prompts) + 8), timeout=600)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, http_client=http)
    start = time.perf_counter()
    results = await asyncio.gather(*[_one(client, p, n, d, start) for p, n, d in zip(prompts, outputs, arrivals,
                                                                                     strict=True)])
    await http.aclose()
    return start, results


def load_figures(base_url, prompts, outputs, rate, seed=1) -> dict:
    start, results = asyncio.run(_load(base_url, prompts, outputs, rate, seed))
    end = max(times[-1] for _, times, _ in results)
    tokens = sum(n for _, _, n in results)
    ttft = [times[0] - sent for sent, times, _ in results]
    gaps = [b - a for _, times, _ in results for a, b in zip(times[:-1], times[1:], strict=True)]
    tpot = [(times[-1] - times[0]) / (n - 1) for _, times, n in results if n > 1]
    return {"rate": rate, "seconds": end - start, "tokens": tokens, "tok_s": tokens / (end - start),
            "req_s": len(prompts) / (end - start), "ttft": np.percentile(ttft, [50, 99]),
            "tpot": np.percentile(tpot, [50, 99]), "gaps": np.percentile(gaps, [50, 99]),
            "exact": tokens == sum(outputs)}


def static_batches(model, params, prompts, outputs, slots):
    """A run of generate() in batches of `slots` in arrival order, left-padded, each to its longest output."""
    import jax

    import jamba_jax

    batches = [range(i, min(i + slots, len(prompts))) for i in range(0, len(prompts), slots)]

    def run():
        for b in batches:
            width = max(len(prompts[i]) for i in b)
            ids = np.zeros((len(b), width), np.int32)
            mask = np.zeros_like(ids)
            for row, i in enumerate(b):
                ids[row, width - len(prompts[i]):], mask[row, width - len(prompts[i]):] = prompts[i], 1
            jax.block_until_ready(jamba_jax.generate(model, params, ids, attention_mask=mask,
                                                     max_new_tokens=max(outputs[i] for i in b)))

    return run


def engine_in_process(model, params, checkpoint, prompts, outputs, slots, decode_steps):
    """A run of the same engine as the server's, all requests at once, stepped in this process (no HTTP)."""
    from common.tokenizers import load_tokenizer
    from serving import Engine, EngineConfig, SamplingParams

    engine = Engine(model, params, load_tokenizer(os.path.join(checkpoint, "tokenizer.json"), model.cfg.vocab_size),
                    EngineConfig(max_num_seqs=slots, max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=512,
                                 prefill_chunk=128, decode_steps=decode_steps))
    engine.warmup()
    sampling = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in outputs]
    return lambda: engine.generate(prompts, sampling)


def prefill_costs(model, params, length: int = 64) -> dict:
    """Milliseconds per prompt token of a prefill of `length` tokens from a fresh cache, one row vs eight."""
    import jax

    from benchmarks.common import time_fn
    from jamba_jax.generation import prefill_step

    out = {}
    for rows in (1, 8):
        ids, mask = np.ones((rows, length), np.int32), np.ones((rows, length), bool)
        seconds = time_fn(lambda r=rows, i=ids, m=mask: jax.block_until_ready(
            prefill_step(model, params, model.init_cache(r, length), i, m)[0]))
        out[rows] = seconds * 1e3 / (rows * length)
    return out


def burst_rounds(server, checkpoint, prompts, outputs, args, rounds: int = 5):
    """All requests at once three ways, timed in alternation (a slow phase of this VM then slows each alike):
    over HTTP to the server, the engine in this process, static generate() batches; the medians, and the median
    of each round's ratios to static batching (a round's runs share the VM's phase)."""
    import statistics

    import jamba_jax

    cfg, params = jamba_jax.load_checkpoint(checkpoint)
    model = jamba_jax.JambaForCausalLM(cfg)
    static, alone = static_batches(model, params, prompts, outputs, args.slots), engine_in_process(
        model, params, checkpoint, prompts, outputs, args.slots, args.decode_steps)
    static()
    alone()  # (every shape compiled)
    http, times = [], {"static": [], "alone": []}
    for _ in range(rounds):
        before = server.compilations()
        http.append({**load_figures(server.base_url, prompts, outputs, 0.0),
                     "compilations": server.compilations() - before})
        for name, run in (("static", static), ("alone", alone)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
        print(http[-1]["tok_s"], times, flush=True)
    median = sorted(http, key=lambda x: x["tok_s"])[len(http) // 2]
    median["compilations"] = sum(x["compilations"] for x in http)
    peers = {name: {"seconds": statistics.median(ts), "tok_s": sum(outputs) / statistics.median(ts),
                    "all": [sum(outputs) / t for t in ts]} for name, ts in times.items()}
    median["all"] = [x["tok_s"] for x in http]
    for name, tok_s in (("server", median["all"]), ("alone", peers["alone"]["all"])):
        peers["static"][f"{name}_ratios"] = [a / b for a, b in zip(tok_s, peers["static"]["all"], strict=True)]
    peers["alone"]["prefill_ms_per_token"] = prefill_costs(model, params)
    return median, peers["static"], peers["alone"]


def transformers_one_at_a_time(hf, prompts, outputs) -> dict:
    import torch

    with torch.no_grad():
        hf.generate(torch.tensor([prompts[0]]), do_sample=False, max_new_tokens=2, min_new_tokens=2)  # warm-up
        start = time.perf_counter()
        for p, n in zip(prompts, outputs, strict=True):
            hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tok_s": sum(outputs) / seconds, "req_s": len(prompts) / seconds}


def plot(loads, static, hf, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([x["ttft"][0] for x in loads], [x["tok_s"] for x in loads], "o-", label="server (continuous batching)")
    for x in loads:
        ax.annotate(load_name(x["rate"]), (x["ttft"][0], x["tok_s"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axhline(static["tok_s"], color="C1", ls="--", label="generate(), static batches")
    ax.axhline(hf["tok_s"], color="C2", ls=":", label="transformers, one at a time")
    ax.set_xlabel("time to first token, p50 (s)")
    ax.set_ylabel("output tokens / s")
    ax.set_xscale("log")
    ax.margins(x=0.25)
    ax.legend(fontsize=8)
    ax.set_title("Serving the 11.6M Jamba on this CPU")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)


def load_name(rate: float) -> str:
    return "all at once" if not rate else f"Poisson {rate:g} req/s"


def fcfs_decode_steps(outputs, slots: int) -> int:
    """Decode steps of `outputs` (tokens per request) through `slots` slots first come first served, each request
    taking the first slot to free (calls of one step, prefill free): the engine's order, without the end of a
    call between a slot's freeing and its refill."""
    free_at = [0] * slots
    for n in outputs:
        i = free_at.index(min(free_at))
        free_at[i] += n
    return max(free_at)


def why_not_more(args, alone, server_vs_alone: float, alone_vs_static: float) -> str:
    """The report's paragraph on what bounds continuous batching's gain over static batches here."""
    _, outputs = workload(args.requests)
    static_steps = sum(max(outputs[i:i + args.slots]) for i in range(0, len(outputs), args.slots))
    ideal_steps = -(-sum(outputs) // args.slots)
    fcfs_steps = fcfs_decode_steps(outputs, args.slots)
    return f"""Why continuous batching gains {alone_vs_static:.1f}x here and not more: static batching loses only
in decoding (each batch runs to its longest output: {static_steps:,} decode steps for these requests, against
{ideal_steps:,} if every slot stayed busy and {fcfs_steps:,} first come first served, the engine's order), while
prompts cost both about the same. On this CPU a prompt prefilled alone costs {alone['prefill_ms_per_token'][1]:.2f} ms per
token against {alone['prefill_ms_per_token'][8]:.2f} in a batch of eight (64 tokens each, measured in this run: a prefill call reads every
expert's weights whatever its rows). The engine prefills waiting prompts ahead of their slots, several at a time,
beside the running decode call (`serving/staging.py`), and puts one into a slot the step that slot frees; but a
group is padded to its longest prompt, so batching saves little compute here, and the prefills share the two
cores with the decode calls. Over HTTP the server runs at {server_vs_alone:.2f}x the engine stepped in-process (the
client's parsing of the streamed events, the event loop and SSE share the two cores with XLA).
"""


def report(args, loads, static, hf, alone, startup):
    rows = "\n".join(
        f"| {load_name(x['rate'])} | "
        f"{x['tok_s']:,.0f} | {x['req_s']:.2f} | {x['ttft'][0] * 1e3:,.0f} / {x['ttft'][1] * 1e3:,.0f} | "
        f"{x['tpot'][0] * 1e3:.1f} / {x['tpot'][1] * 1e3:.1f} | {x['gaps'][0] * 1e3:.1f} / {x['gaps'][1] * 1e3:.1f} | "
        f"{x['compilations']} |" for x in loads)
    burst = next(x for x in loads if not x["rate"])
    vs_static, alone_vs_static = (float(np.median(static[f"{k}_ratios"])) for k in ("server", "alone"))
    return f"""## Serving: continuous batching over HTTP vs static batches and transformers (issue 29)

Command: `python -m benchmarks.serving --requests {args.requests} --slots {args.slots} --rates {' '.join(map(str, args.rates))} --decode_steps {args.decode_steps}`
Machine: {machine()}. Model: the 11.6M benchmark Jamba (`benchmarks/long_context.bench_cfg`, float32, random
weights from transformers with torch seed 0, bundled tokenizer). Server: `main.py --config=configs/serve.py`
in its own process, {args.slots} slots x {MAX_MODEL_LEN} tokens, max_num_batched_tokens 512, prefill_chunk 128
(start-up: {startup[startup.index("warm-up"):] if "warm-up" in startup else startup}: every program compiled before the first request).
Workload: {args.requests} requests, prompts uniform in [8, 96] tokens, outputs log-normal (median 48, clipped
to [4, 384]; {static['tokens']:,} output tokens in all), greedy, each run to its drawn length
(`ignore_eos`), sent by the official `openai` client (async, streaming). Tokens/s counts output tokens from the
first request sent to the last token received; TTFT from a request's send to its first streamed token. The
server runs {args.decode_steps} decode steps per device call and streams each call's tokens of a request as one
event, so inter-token latency is given per token (a request's last token time less its first, over its tokens
less one) and between events (what a reader sees: bursts of up to {args.decode_steps} tokens).

| load | output tok/s | req/s | TTFT p50 / p99 (ms) | ITL per token p50 / p99 (ms) | between events p50 / p99 (ms) | XLA compilations during the load |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
{rows}

All at once, five rounds timed in alternation (the server over HTTP, the same engine stepped in the
benchmark's process without HTTP, static `generate()` batches), medians; the server's five runs gave
{', '.join(f"{x:,.0f}" for x in burst['all'])} tok/s, static batching's {', '.join(f"{x:,.0f}" for x in static['all'])}, the
engine in-process's {', '.join(f"{x:,.0f}" for x in alone['all'])}. Against static batching each figure below is the median of the
rounds' ratios (the server's: {', '.join(f"{x:.2f}" for x in static['server_ratios'])}; the engine in-process's:
{', '.join(f"{x:.2f}" for x in static['alone_ratios'])}), as a round's runs share this VM's phase. Transformers ran once, after:

| | output tok/s | seconds | server all-at-once vs it | the engine without HTTP vs it |
| --- | ---: | ---: | ---: | ---: |
| the engine stepped in-process (no HTTP, no client) | {alone['tok_s']:,.0f} | {alone['seconds']:.1f} | {burst['tok_s'] / alone['tok_s']:.2f}x | 1x |
| `generate()`, static batches of {args.slots} in arrival order (each waits for its longest) | {static['tok_s']:,.0f} | {static['seconds']:.1f} | **{vs_static:.2f}x** | {alone_vs_static:.2f}x |
| transformers `generate`, one request at a time | {hf['tok_s']:,.0f} | {hf['seconds']:.1f} | **{burst['tok_s'] / hf['tok_s']:.1f}x** | {alone['tok_s'] / hf['tok_s']:.1f}x |

{why_not_more(args, alone, burst['tok_s'] / alone['tok_s'], alone_vs_static)}
Targets: all-at-once at least 2x static batching ({"met" if vs_static >= 2 else "not met"}) and 10x
transformers one at a time ({"met" if burst['tok_s'] >= 10 * hf['tok_s'] else "not met"}); no compilation after the warm-up
({"met" if all(x['compilations'] == 0 for x in loads) else "not met"}). Every request returned its drawn number of
tokens: {all(x['exact'] for x in loads)}. The soak (64
requests with random lengths, cancellations and stop strings, each equal to generate() alone, slots back to
empty) is `tests/test_serving.py::test_a_soak_of_random_requests_loses_nothing_and_returns_the_slots`.

![throughput vs time to first token](benchmarks/figures/serving.png)
"""


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--rates", type=float, nargs="*", default=[2.0, 4.0, 8.0])
    parser.add_argument("--decode_steps", type=int, default=8, help="the server's --config.decode_steps")
    parser.add_argument("--no_write", action="store_true",
                        help="print the section, leave BENCHMARKS.md and the figure alone")
    args = parser.parse_args(argv)
    prompts, outputs = workload(args.requests)
    with tempfile.TemporaryDirectory() as checkpoint:
        hf = save_checkpoint(checkpoint)
        loads = []
        with Server(checkpoint, args.slots, args.decode_steps) as server:
            burst, static, alone = burst_rounds(server, checkpoint, prompts, outputs, args)
            loads.append(burst)
            for rate in args.rates:
                before = server.compilations()
                figures = load_figures(server.base_url, prompts, outputs, rate)
                figures["compilations"] = server.compilations() - before
                loads.append(figures)
                print(figures, flush=True)
        static["tokens"] = sum(outputs)
        print("static", static, "engine in process", alone, flush=True)
    theirs = transformers_one_at_a_time(hf, prompts, outputs)
    print("transformers", theirs, flush=True)
    body = report(args, loads, static, theirs, alone, server.startup)
    print(body)
    if not args.no_write:
        plot(loads, static, theirs, FIGURE)
        write_section("serving", body)


if __name__ == "__main__":
    main()
