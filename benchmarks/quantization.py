"""ExpertsInt8 figures: weight bytes of Jamba-1.5-Mini and Large from the config alone (bf16 vs
ExpertsInt8), the paper's 8 x 80 GB claim checked on paper, and the tiny model's forward time on
this CPU, quantised vs not, in the same process.

  python -m benchmarks.quantization
"""

from __future__ import annotations

import jax
import numpy as np

import jamba_jax
from benchmarks.common import machine, time_fn, write_section
from configs import jamba_large, jamba_mini, jamba_tiny
from jamba_jax.quantization import weight_bytes

GB = 1e9


def main():
    rows = []
    for name, module in (("Jamba-1.5-Mini", jamba_mini), ("Jamba-1.5-Large", jamba_large)):
        cfg = jamba_jax.JambaConfig.from_dict(module.get_config().model.to_dict())
        b = weight_bytes(cfg, "bfloat16")
        kv = jamba_jax.cache_bytes(cfg, 1, 262144, "bfloat16")["total"]
        rows.append(f"| {name} | {b['experts_baseline'] / GB:,.1f} | {b['experts_int8'] / GB:,.1f} | "
                    f"{b['experts_int8'] / b['experts_baseline']:.3f} | {b['baseline'] / GB:,.1f} | {b['int8'] / GB:,.1f} | "
                    f"{kv / GB:.1f} | {'yes' if b['int8'] + kv < 640 * GB else 'no'} ({(b['int8'] + kv) / GB:,.0f} of 640 GB) |")

    cfg = jamba_jax.JambaConfig.from_dict(jamba_tiny.get_config().model.to_dict())
    params = jamba_jax.init_params(cfg, jax.random.PRNGKey(0))
    qparams = jamba_jax.quantize_experts_int8(cfg, params)
    ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (4, 512))
    timings = {}
    for label, c, p in (("float32", cfg, params), ("ExpertsInt8 (float32 activations)", cfg, qparams),
                        ("bfloat16", cfg.replace(dtype="bfloat16"), params),
                        ("ExpertsInt8 (bfloat16 activations)", cfg.replace(dtype="bfloat16"), qparams)):
        m = jamba_jax.JambaForCausalLM(c)
        fwd = jax.jit(lambda p_, x, m=m: m.apply({"params": p_}, x).logits)
        timings[label] = time_fn(lambda fwd=fwd, p=p: fwd(p, ids).block_until_ready(), repeats=5)
    base = timings["float32"]
    timing_rows = [f"| {k} | {v:.4f} | {base / v:.2f}x |" for k, v in timings.items()]
    body = f"""## ExpertsInt8 (issue: ExpertsInt8)

Command: `python -m benchmarks.quantization`. Machine: {machine()}.
Weight bytes from the configs alone (`jamba_jax.quantization.weight_bytes`): bf16 vs int8 expert and
dense-MLP weights with one float32 scale per output channel per expert; everything else bf16.
KV cache: one 256K-token sequence in bf16 plus Mamba states (`jamba_jax.cache_bytes`).

| model | experts bf16 GB | experts int8 GB | ratio | all weights bf16 GB | all weights ExpertsInt8 GB | 256K cache GB | fits 8 x 80 GB |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |
""" + "\n".join(rows) + """

Forward of the tiny model on this CPU (batch 4 x 512, median of 5 after warm-up, same process). XLA:CPU has
no int8 matmul advantage: the int8 -> compute-dtype convert is extra work here; the win is memory (and
memory bandwidth on accelerators).

| weights / activations | seconds / forward | speed vs float32 |
| --- | ---: | ---: |
""" + "\n".join(timing_rows) + "\n"
    print(body)
    write_section("quantization", body)


if __name__ == "__main__":
    main()
