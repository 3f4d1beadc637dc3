"""The project's one accelerator script: compiled kernel checks and figures against the device's
own limits, measured in the same process.

  python -m benchmarks.accelerator [--out DIR] [--small] [--skip train,decode]

On a GPU or TPU (estimated at about 8 minutes on one H100, plus part 7: three compilations of its decode loop):
  1. checks: the Pallas selective scan (forward, every gradient, reset, bf16), int8_matmul and the
     flash-attention forward (values, and gradients through the blockwise backward), compiled,
     against their jnp references; then flash attention vs the blockwise XLA path for a 2K prefill
     chunk into 32K and 128K caches (TFLOP/s against the matmul peak);
  2. limits: HBM bandwidth (a 2 GiB elementwise pass: bytes read + written / second) and the bf16
     matmul peak (8192^3 `jnp.dot`);
  3. selective scan, forward and forward+backward, `pallas` / `chunked` / `scan` at 2K, 16K and 64K
     tokens (Jamba-1.5-Mini's per-device Mamba layer: d_inner 8192, d_state 16, bf16, with D, z,
     delta bias and softplus): GB/s of compulsory traffic (every input read once, every output
     written once) as a fraction of the measured bandwidth;
  4. int8_matmul (Pallas and XLA) vs a bf16 matmul at Jamba-1.5-Mini's expert shapes: TFLOP/s;
  5. a bf16 Jamba train step at about 1B parameters: tokens/s and model FLOPs utilisation
     (6 x active parameters + 12 x attention layers x hidden x sequence per token, PaLM's count)
     against the measured matmul peak;
  6. decode tokens/s at batch 1 and 64 with the same model (random weights);
  7. decode from a long cache per KV cache dtype (float32, bfloat16, int8), batch 8 from 128K tokens, against
     the bandwidth bound for the bytes each step reads (issue 32; `benchmarks.decode`).
Targets (issue 12): scan >= 50% of measured HBM bandwidth; train step >= 35% MFU.

On a CPU the same program runs at small shapes (Pallas kernels interpreted) so that it is known
to work before a device is lent. Needs only jax, flax, optax and numpy (no ml_collections, grain or
torch). Writes the `accelerator` section of BENCHMARKS.md, and with --out also DIR/accelerator.md
and DIR/accelerator.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform as py_platform
import sys
import time
import traceback
import types

import jax
import jax.numpy as jnp
import numpy as np

import jamba_jax
from benchmarks.accelerator_attention import attention_report, attention_speed, check_attention
from benchmarks.accelerator_kernels import (
    check_int8,
    check_scan,
    int8_speed,
    scan_speed,
    timed,
    tpu_vmem_report,
    tune_gpu_scan,
)
from benchmarks.common import copy_bandwidth, write_section
from benchmarks.decode import DECODE_TOKENS, filled_cache, measure, step_seconds
from benchmarks.decode import table as long_decode_table
from common.attention import kv_store
from jamba_jax.losses import target_weights
from kernels import current_platform
from training.optim import make_optimizer
from training.step import init_state, make_train_step
from training.task import Task

GIB = 2**30


# ------------------------------------------------------------------------------------------------
# limits of this device, measured here
# ------------------------------------------------------------------------------------------------
def hbm_bandwidth(small: bool) -> float:
    """Bytes/s of an elementwise pass over a large array (read once, written once, in place)."""
    return copy_bandwidth(64 * 2**20 if small else 2 * GIB, repeats=10)


def matmul_peak(small: bool) -> tuple[float, str]:
    """FLOP/s of a large square matmul in the dtype the models train in on this device."""
    n, dtype = (2048, jnp.float32) if small else (8192, jnp.bfloat16)
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    fn = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dtype))
    return 2 * n**3 / timed(fn, a, b, repeats=10), f"{n}^3 {jnp.dtype(dtype).name} jnp.dot"


# ------------------------------------------------------------------------------------------------
# a Jamba model of about 1B parameters: train step and decoding
# ------------------------------------------------------------------------------------------------
def model_config(small: bool) -> jamba_jax.JambaConfig:
    if small:
        return jamba_jax.JambaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                                     num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                     num_experts_per_tok=2, mamba_dt_rank=8, dtype="bfloat16")
    # 8 layers in Jamba's pattern (attention at layer 4, MoE at odd layers): 0.97B parameters
    return jamba_jax.JambaConfig(vocab_size=65536, hidden_size=2048, intermediate_size=4096, num_hidden_layers=8,
                                 num_attention_heads=16, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                                 mamba_dt_rank=128, dtype="bfloat16", remat_policy="full")


class LMTask(Task):
    """Next-token cross-entropy (the model's chunked `token_nll`) + router aux loss: the jamba_lm task's
    objective without its data stack."""

    def __init__(self, cfg):
        self.cfg, self.model = cfg, jamba_jax.JambaForCausalLM(cfg)

    def init_params(self, rng):
        return jamba_jax.init_params(self.cfg, rng)

    def sums(self, params, batch, rng, frozen):
        inputs = batch["inputs"]
        out = self.model.apply({"params": params}, inputs, jnp.pad(inputs[:, 1:], [(0, 0), (0, 1)]), None,
                               batch["segment_ids"], method="token_nll")
        w = target_weights(inputs, None, batch["segment_ids"])
        tokens, ce = jnp.sum(w), jnp.sum(out.token_nll[:, :-1] * w)
        return {"loss": ce, "tokens": tokens, "objective": ce + tokens * self.cfg.router_aux_loss_coef * out.aux_loss}


def train_speed(small: bool, peak: float) -> dict:
    cfg = model_config(small)
    counts = jamba_jax.count_params(cfg)
    batch_size, seq = (2, 128) if small else (8, 2048)
    task = LMTask(cfg)
    optimizer = make_optimizer(types.SimpleNamespace(grad_clip_norm=1.0, learning_rate=1e-4, warmup_steps=10,
                                                     num_train_steps=1000, min_lr_ratio=0.1, adam_b1=0.9,
                                                     adam_b2=0.95, adam_eps=1e-8, weight_decay=0.1))
    state = jax.jit(lambda r: init_state(task, optimizer, r))(jax.random.PRNGKey(0))
    ids = jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, (batch_size, seq)), jnp.int32)
    batch = {"inputs": ids, "segment_ids": jnp.ones_like(ids)}
    step = jax.jit(make_train_step(task, optimizer, 1), donate_argnums=(0,))
    compile_start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - compile_start
    holder = {"state": state}

    def one():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics["loss"]

    t = timed(lambda: one(), repeats=5, warmup=2)
    tokens = batch_size * seq
    n_attn = sum(cfg.is_attention_layer(i) for i in range(cfg.num_hidden_layers))
    flops_per_token = 6 * counts["active"] + 12 * n_attn * cfg.hidden_size * seq
    return dict(params=counts["total"], active=counts["active"], batch=batch_size, seq=seq, seconds=t,
                tokens_per_s=tokens / t, mfu=flops_per_token * tokens / t / peak, compile_s=compile_s)


def _decode_model(small: bool):
    """The 1B model for decoding, its weights in the compute dtype (what a server holds)."""
    cfg = model_config(small).replace(remat_policy="none")
    params = jax.tree.map(lambda x: x.astype(cfg.compute_dtype), jamba_jax.init_params(cfg, jax.random.PRNGKey(0)))
    return cfg, jamba_jax.JambaForCausalLM(cfg), params


def decode_speed(small: bool) -> list[dict]:
    """Prefill + first token through `generate`, and decode tokens/s from a step of the compiled decode loop after
    a prompt's worth of cache (`benchmarks.decode.step_seconds`), at batch 1 and 64."""
    cfg, model, params = _decode_model(small)
    prompt = 16 if small else 128
    rows = []
    for batch in (1, 64):
        ids = np.random.RandomState(batch).randint(3, cfg.vocab_size, (batch, prompt)).astype(np.int32)
        t1 = timed(functools.partial(jamba_jax.generate, model, params, ids, max_new_tokens=1, eos_token_id=None),
                   repeats=3)
        step = step_seconds(model, params, filled_cache(cfg, prompt, None, batch))
        rows.append(dict(batch=batch, prompt=prompt, new_tokens=DECODE_TOKENS, prefill_s=t1,
                         decode_tokens_per_s=batch / step))
    return rows


def long_decode(small: bool, bandwidth: float) -> dict:
    """Issue 32's decode from a long cache on the device: the 1B model (bf16 weights), batch 8 from 128K tokens
    (small: batch 2 from 2K), per KV cache dtype: ms per token against HBM bandwidth for the bytes a step reads."""
    cfg, _, params = _decode_model(small)
    batch, context = (2, 2048) if small else (8, 131072)
    return measure(context, list(kv_store.KV_CACHE_DTYPES), cfg, params, batch, bandwidth, contexts=(context,))


# ------------------------------------------------------------------------------------------------
def _decode_report(res: dict) -> list[str]:
    """Parts 7 and 6: decode from a long cache per KV dtype, decode tokens/s."""
    lines = []
    if res.get("long_decode"):
        r0 = res["long_decode"]["rows"][0]
        lines += [f"Decode from a long cache (issue 32), the same model with bf16 weights, batch {r0['batch']}, "
                  f"{r0['context']:,} tokens of random keys and values per row, per KV cache dtype; bound: the bytes a "
                  "step reads (active weights, the KV cache, the Mamba states) over the memory bandwidth above.", ""]
        lines += long_decode_table(res["long_decode"]) + [""]
    if res.get("decode"):
        lines += ["| decode batch | prompt | new tokens | prefill + 1 token s | decode tokens/s |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['batch']} | {r['prompt']} | {r['new_tokens']} | {r['prefill_s']:.3f} | "
                  f"{r['decode_tokens_per_s']:,.0f} |" for r in res["decode"]]
        lines.append("")
    return lines


def report(res: dict) -> str:
    small = res["small"]
    lines = ["## Accelerator: kernels compiled, scan bandwidth, int8 matmul, 1B train step, decode (issue 12)", "",
             f"Command: `python -m benchmarks.accelerator{' --small' if small else ''}`",
             f"Device: {res['device']}; jax {res['jax']}; Python {res['python']}. Figures are ratios to this "
             f"device's limits measured in the same run: memory {res['bandwidth'] / 1e9:,.0f} GB/s "
             f"(elementwise pass, read + write), matmul peak {res['peak'] / 1e12:,.1f} TFLOP/s ({res['peak_what']}).",
             ""]
    if small:
        lines += ["Small shapes on a CPU, Pallas kernels interpreted: this proves the script runs, not speed.", ""]
    lines += [f"TPU scan kernel VMEM per program (`ssm_pallas_tpu.vmem_bytes`, 256K tokens): {res['tpu_vmem']}.", ""]
    if res.get("checks"):
        bad = [c for c in res["checks"] if not c["ok"]]
        worst = max(res["checks"], key=lambda c: c["rel_err"])
        lines += [f"Kernel checks (compiled{' -> interpreted on CPU' if small else ''}, against the jnp references): "
                  f"{len(res['checks']) - len(bad)} of {len(res['checks'])} within tolerance; worst relative error "
                  f"{worst['rel_err']:.1e} ({worst['kernel']} {worst['output']} {worst['shape']} {worst['dtype']})."
                  + ("".join(f" FAILED: {c['kernel']} {c['output']} {c['shape']} {c['dtype']} {c['rel_err']:.1e}."
                             for c in bad)), ""]
    if res.get("scan"):
        lines += ["Selective scan, bf16, batch 1, d_inner 8192, d_state 16 (small: 128), with D, z, bias, softplus. "
                  "GB/s counts every input read once and every output written once (forward+backward: the "
                  "forward's traffic, the inputs and dy read again, the gradients written).", "",
                  "| length | impl | mode | ms | GB/s | of HBM bandwidth |", "| ---: | --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {r['length']} | {r['impl']} | {r['mode']} | {r['seconds'] * 1e3:.2f} | {r['gbps']:.1f} | "
                  f"{r['frac_bw']:.1%} |" for r in res["scan"]]
        lines.append("")
    if res.get("tune"):
        lines += ["GPU scan kernel knobs at 16K tokens (defaults: the first row):", "",
                  "| channels / program | steps / load group | warps | fwd ms | fwd+bwd ms |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['tile']} | {r['group']} | {r['warps']} | {r['fwd_s'] * 1e3:.2f} | {r['fwd_bwd_s'] * 1e3:.2f} |"
                  for r in res["tune"]]
        lines.append("")
    lines += attention_report(res.get("attention"))
    if res.get("int8"):
        lines += ["int8_matmul (bf16 activations, int8 weights, per-column scales) vs a bf16 matmul of the same "
                  "shape (M x K x N).", "", "| shape | impl | ms | TFLOP/s | weight GB/s |",
                  "| --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {r['shape']} | {r['impl']} | {r['seconds'] * 1e3:.3f} | {r['tflops']:.1f} | "
                  f"{r['weight_gbps']:.0f} |" for r in res["int8"]]
        lines.append("")
    if res.get("train"):
        t = res["train"]
        lines += [f"Train step (bf16 compute, float32 params, remat, AdamW), {t['params'] / 1e6:,.1f}M parameters "
                  f"({t['active'] / 1e6:,.1f}M active), batch {t['batch']} x {t['seq']}: {t['seconds'] * 1e3:.0f} ms, "
                  f"{t['tokens_per_s']:,.0f} tokens/s, MFU {t['mfu']:.1%} (compile {t['compile_s']:.0f} s).", ""]
    lines += _decode_report(res)
    lines += [f"Total wall time {res['wall_s']:.0f} s."]
    if res.get("errors"):
        lines += ["", "Errors:"] + [f"- {e}" for e in res["errors"]]
    return "\n".join(lines)


def save(out: str, res: dict, body: str | None = None) -> None:
    """DIR/accelerator.json (the results so far), and with the report DIR/accelerator.md."""
    os.makedirs(out, exist_ok=True)
    if body is not None:
        with open(os.path.join(out, "accelerator.md"), "w") as f:
            f.write(body + "\n")
    with open(os.path.join(out, "accelerator.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="small shapes (the default on a CPU)")
    parser.add_argument("--out", default="", help="also write accelerator.md and accelerator.json here")
    parser.add_argument("--skip", default="",
                        help="comma-separated parts to skip: checks,attention,scan,int8,train,decode,long_decode")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    parser.add_argument("--tune", action="store_true", help="also sweep the GPU scan kernel's knobs (GPU only)")
    args = parser.parse_args(argv)
    small = args.small or current_platform() == "cpu"
    skip = set(filter(None, args.skip.split(",")))
    start = time.perf_counter()
    dev = jax.devices()[0]
    res = dict(small=small, device=f"{dev.device_kind} ({dev.platform})", jax=jax.__version__,
               python=py_platform.python_version(), errors=[])
    print(f"device {res['device']}, jax {res['jax']}, small={small}", flush=True)
    res["tpu_vmem"] = tpu_vmem_report()
    res["bandwidth"] = hbm_bandwidth(small)
    res["peak"], res["peak_what"] = matmul_peak(small)
    print(f"bandwidth {res['bandwidth'] / 1e9:.0f} GB/s, peak {res['peak'] / 1e12:.1f} TFLOP/s", flush=True)
    parts = [("checks", lambda: check_scan(small) + check_int8(small) + check_attention(small)),
             ("attention", lambda: attention_speed(small, res["peak"])),
             ("scan", lambda: scan_speed(small, res["bandwidth"])),
             ("tune", lambda: tune_gpu_scan() if args.tune and current_platform() == "gpu" else None),
             ("int8", lambda: int8_speed(small)),
             ("train", lambda: train_speed(small, res["peak"])),
             ("decode", lambda: decode_speed(small)),
             ("long_decode", lambda: long_decode(small, res["bandwidth"]))]
    for name, fn in parts:
        if name in skip:
            continue
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:  # keep measuring the other parts; the report names what broke
            traceback.print_exc()
            res["errors"].append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
        if args.out:  # the parts so far, should the device's time limit stop the run before the end
            save(args.out, res)
    res["wall_s"] = time.perf_counter() - start
    body = report(res)
    print(body)
    if args.out:
        save(args.out, res, body)
    if not args.no_write:
        write_section("accelerator_small" if small else "accelerator", body)
    failed = [c for c in res.get("checks", []) if not c["ok"]]
    return 1 if failed or res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
