"""Trace + lower and compile times of Jamba-1.5-Mini and -Large, with the decoder layers unrolled
(one copy of each layer in the program) and scanned (`scan_layers`: one period of 8 layers,
scanned over the repeats). Abstract parameters (nothing allocated), batch 1 x 256 tokens, bfloat16
compute, the gradient of the summed logits with respect to every parameter. Each measurement runs
in its own process.

  python -m benchmarks.compile_time [--models mini large] [--layouts unrolled scanned]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CONFIGS = {"mini": "jamba_mini", "large": "jamba_large"}


def _measure(model: str, scanned: bool) -> dict:
    import importlib

    import jax
    import jax.numpy as jnp

    import jamba_jax

    fields = importlib.import_module(f"configs.{CONFIGS[model]}").get_config().model.to_dict()
    fields.update(dtype="bfloat16", remat_policy="full")
    if "scan_layers" in jamba_jax.JambaConfig.__dataclass_fields__:
        fields["scan_layers"] = scanned
    elif scanned:
        raise SystemExit("this checkout has no scan_layers")
    cfg = jamba_jax.JambaConfig.from_dict(fields)
    params = jamba_jax.abstract_params(cfg)
    ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)
    model_ = jamba_jax.JambaForCausalLM(cfg)

    def grad(p, x):
        return jax.grad(lambda p: jnp.sum(model_.apply({"params": p}, x).logits.astype(jnp.float32)))(p)

    start = time.perf_counter()
    lowered = jax.jit(grad).trace(params, ids).lower()
    traced = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    compiled = time.perf_counter() - start
    return {"model": model, "layout": "scanned" if scanned else "unrolled", "layers": cfg.num_hidden_layers,
            "trace_lower_s": traced, "compile_s": compiled}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["mini", "large"])
    parser.add_argument("--layouts", nargs="+", default=["unrolled", "scanned"])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.child[0], args.child[1] == "scanned")))
        return
    rows = []
    for model in args.models:
        for layout in args.layouts:
            out = subprocess.run([sys.executable, "-m", "benchmarks.compile_time", "--child", model, layout],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    from benchmarks.common import machine, write_section

    lines = ["## Compile time, Jamba-1.5-Mini and -Large (issue 13: scanned layers)", "",
             f"Command: `python -m benchmarks.compile_time --models {' '.join(args.models)} "
             f"--layouts {' '.join(args.layouts)}`",
             f"Machine: {machine()}. Abstract parameters, batch 1 x 256, bfloat16 compute, remat, gradient of the "
             "summed logits with respect to every parameter; XLA:CPU, one process per row.", "",
             "| model | layers | layout | trace + lower s | compile s | total s |", "| --- | ---: | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['layers']} | {r['layout']} | {r['trace_lower_s']:.1f} | {r['compile_s']:.1f} | "
              f"{r['trace_lower_s'] + r['compile_s']:.1f} |" for r in rows]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("compile_time", body)


if __name__ == "__main__":
    main()
