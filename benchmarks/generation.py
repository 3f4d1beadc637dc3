"""Generation figures for a benchmark Jamba (`--model`: the 11.6M benchmark model or the tiny config).

Decode: tokens/s of `jamba_jax.generate` vs transformers' `generate` (greedy, same random weights,
same prompts, same CPU, same process), batch 1 and 8.
Prefill: time and peak RSS of a chunked prefill of 8K, 32K and 128K tokens, each in a fresh process.

  python -m benchmarks.generation [--prefill_lengths 8192 32768 131072]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jamba_jax  # noqa: E402
from benchmarks.common import MODEL_NAMES, add_model_arg, model_config, tiny_models  # noqa: E402

PREFILL_CHUNK = 2048


def _prefill_child(length: int, model_name: str) -> None:
    cfg = jamba_jax.JambaConfig.from_dict(model_config(model_name).model.to_dict())
    model = jamba_jax.JambaForCausalLM(cfg)
    params = jamba_jax.init_params(cfg, jax.random.PRNGKey(0))
    ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (1, length)).astype(np.int32)
    jamba_jax.prefill(model, params, ids[:, :PREFILL_CHUNK], max_length=length)  # compile the chunk step
    start = time.perf_counter()
    logits, cache = jamba_jax.prefill(model, params, ids, max_length=length, prefill_chunk=PREFILL_CHUNK)
    jax.block_until_ready((logits, cache))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_bytes": peak,
                      "cache_bytes": jamba_jax.cache_bytes(cfg, 1, length, "float32")["total"]}))


def decode_figures(batches, prompt_len, new_tokens, model_name: str, repeats: int = 5):
    """Per batch: (batch, our median seconds, transformers' median seconds, new tokens, same tokens): each side
    timed `repeats` times back to back after its warm-up (one timed run apiece moved a ratio by 1.5x between
    runs; runs alternated one by one, or after pauses, slowed both: each woke after the other's threads)."""
    import torch

    hf, cfg, params = tiny_models(model_name)
    model = jamba_jax.JambaForCausalLM(cfg)
    rows = []
    for batch in batches:
        ids = np.random.RandomState(batch).randint(3, cfg.vocab_size, (batch, prompt_len))
        jamba_jax.generate(model, params, ids, max_new_tokens=new_tokens)  # compile
        ours_s = []
        for _ in range(repeats):
            start = time.perf_counter()
            ours = jamba_jax.generate(model, params, ids, max_new_tokens=new_tokens)
            ours_s.append(time.perf_counter() - start)
        theirs_s = []
        with torch.no_grad():
            hf.generate(torch.tensor(ids), do_sample=False, max_new_tokens=2, min_new_tokens=2)  # warm-up
            for _ in range(repeats):
                start = time.perf_counter()
                theirs = hf.generate(torch.tensor(ids), do_sample=False, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, eos_token_id=None)
                theirs_s.append(time.perf_counter() - start)
        same = bool((theirs[:, prompt_len:].numpy() == ours).all())
        rows.append((batch, float(np.median(ours_s)), float(np.median(theirs_s)), batch * new_tokens, same))
    return rows


def prefill_lines(prefill: dict) -> list[str]:
    lines = []
    lines.append(f"""
Prefill: one prompt of L random tokens in chunks of {PREFILL_CHUNK} (`jamba_jax.prefill`), fresh process each,
time after compiling the chunk step; peak RSS of the process (Python, JAX, weights, cache, one chunk).

| tokens | seconds | tokens/s | peak RSS MiB | cache MiB (float32 KV + Mamba states) |
| ---: | ---: | ---: | ---: | ---: |""")
    for length, r in prefill.items():
        if r is None:
            lines.append(f"| {length} | failed | | | |")
            continue
        lines.append(f"| {length} | {r['seconds']:.2f} | {length / r['seconds']:,.0f} | {r['peak_bytes'] / 2**20:,.0f} | "
                     f"{r['cache_bytes'] / 2**20:,.1f} |")
    if all(prefill.get(n) for n in (32768, 131072)):
        ratio = prefill[131072]["seconds"] / prefill[32768]["seconds"]
        lines.append(f"\ntime(128K) / time(32K) = {ratio:.2f} (linear would be 4; attention over the cache is quadratic).")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side, back to back; medians")
    parser.add_argument("--prefill_lengths", type=int, nargs="*", default=[8192, 32768, 131072])
    parser.add_argument("--prefill_child", type=int, default=None, help=argparse.SUPPRESS)
    add_model_arg(parser)
    args = parser.parse_args(argv)
    if args.prefill_child:
        return _prefill_child(args.prefill_child, args.model)

    from benchmarks.common import machine, write_section

    decode = decode_figures(args.batches, args.prompt_len, args.new_tokens, args.model, args.repeats)
    prefill = {}
    for length in args.prefill_lengths:
        out = subprocess.run([sys.executable, "-m", "benchmarks.generation", "--prefill_child", str(length), "--model", args.model],
                             capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        prefill[length] = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
        print(length, prefill[length], out.stderr[-500:] if out.returncode else "", flush=True)
    lines = [f"""## Generation against transformers (issues: generation with a hybrid cache, 32)

Command: `python -m benchmarks.generation --batches {' '.join(map(str, args.batches))} {' '.join(['--prefill_lengths', *map(str, args.prefill_lengths)])} --model {args.model}`
Machine: {machine()}; the {MODEL_NAMES[args.model]}, float32, random weights (the same in both for decode).

Decode: prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, no EOS; wall time of the whole
`generate` call (prefill + decode) after a warm-up, median of {args.repeats} runs back to back; then transformers' `generate(do_sample=False)`
with its hybrid cache (Mamba state update, KV cache) on the same prompts, the same way.

| batch | jamba_jax s | tokens/s | transformers s | tokens/s | speed-up | same tokens |
| ---: | ---: | ---: | ---: | ---: | ---: | --- |"""]
    for batch, t_ours, t_hf, n, same in decode:
        lines.append(f"| {batch} | {t_ours:.3f} | {n / t_ours:,.0f} | {t_hf:.3f} | {n / t_hf:,.0f} | {t_hf / t_ours:.1f}x | {same} |")
    lines += prefill_lines(prefill) if prefill else [
        "\nPrefill: not measured in this run (`--prefill_lengths`; long prompts: the `long_context` section)."]
    body = "\n".join(lines) + "\n"
    print(body)
    write_section("generation", body)


if __name__ == "__main__":
    main()
