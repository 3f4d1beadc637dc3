"""Model FLOPs utilisation of a training step at a width where matmuls dominate, and where its time goes.

  python -m benchmarks.mfu [--batch 2 --seq_len 1024 --repeats 3]

The Jamba layer pattern at hidden 1024: 8 layers (attention at layer 4, Mamba elsewhere; 4 experts top-2 at
the odd layers, dense MLPs at the even ones), Mini's ratios scaled (8 query heads of 128 over 2 KV heads,
expert / MLP hidden 3.5 x 1024 = 3584, Mamba d_inner 2048, d_state 16, dt_rank 64), vocab 2048, untied head,
float32 on CPU (bfloat16 on accelerators), remat_policy "none". One full train step (forward, chunked loss,
backward, AdamW) on batch x seq_len tokens.

- FLOPs counted from the model (`train_flops`: 3 x the forward's matmuls, attention and scan, no remat
  recomputation) beside XLA's cost analysis of the compiled step (which counts a loop's body once and also
  counts elementwise work);
- MFU = model FLOPs / step time / the float32 matmul peak of a 2048^3 `jnp.dot` in the same process;
- the breakdown: a profile of the step (jax.profiler), each XLA op's time assigned to a component by its
  source (the op's name in the jaxpr: layer, module, primitive), as a table and a PNG bar chart.

Writes the `mfu` section of BENCHMARKS.md and benchmarks/figures/mfu.png.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax
import numpy as np

from benchmarks.common import ROOT, machine, time_fn, write_section
from benchmarks.long_context import matmul_peak
from configs import jamba_tiny
from jamba_jax import JambaConfig
from jamba_jax.params import abstract_params, flat_items
from tasks.jamba_lm import JambaLMTask
from training.optim import make_optimizer
from training.step import init_state, make_train_step

FIGURE = os.path.join(ROOT, "benchmarks", "figures", "mfu.png")


def mfu_config() -> dict:
    return dict(vocab_size=2048, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=8, attn_layer_offset=4,
                expert_layer_period=2, expert_layer_offset=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
                mamba_dt_rank=64, tie_word_embeddings=False, remat_policy="none", dtype="float32",
                param_dtype="float32")


def train_flops(cfg: JambaConfig, batch: int, length: int) -> dict[str, float]:
    """Model FLOPs of one training step (3 x the forward: the backward computes two products per forward one),
    by kind: matmuls (every weight of 2+ dims but the embedding table and the conv kernel, experts at
    top_k / num_experts), causal attention (q k^T and p v over the keys at or before each query), the
    selective scan (per token, channel and state: exp(dt A), dt B u, the update h = a h + b and C h: 7 FLOPs
    and an exponential) and the depthwise conv."""
    tokens = batch * length
    matmul = 0.0
    for keys, leaf in flat_items(abstract_params(cfg)):
        name = "/".join(keys)
        if len(leaf.shape) < 2 or "embed_tokens" in name or "conv_kernel" in name or "A_log" in name:
            continue
        n = float(np.prod(leaf.shape))
        if "experts" in name:
            n *= cfg.num_experts_per_tok / cfg.num_experts
        matmul += 2 * n * tokens
    n_attn = sum(cfg.is_attention_layer(i) for i in range(cfg.num_hidden_layers))
    attention = n_attn * batch * 2 * 2 * cfg.num_attention_heads * cfg.head_dim * length * (length + 1) / 2
    n_mamba = cfg.num_hidden_layers - n_attn
    scan = n_mamba * tokens * cfg.mamba_d_inner * cfg.mamba_d_state * 8
    conv = n_mamba * tokens * cfg.mamba_d_inner * 2 * cfg.mamba_d_conv
    fwd = {"matmul": matmul, "attention": attention, "scan": scan, "conv": conv}
    return {k: 3 * v for k, v in fwd.items()}


# components, first match wins, on the op's source path (jaxpr name stack + primitive)
COMPONENTS = (
    ("optimizer (AdamW)", r"^(?!.*JambaForCausalLM).*"),
    ("loss (head + cross-entropy)", r"token_nll\)?/(while|checkpoint|closed_call|jit\(take_along_axis\)|"
                                    r"rematted|jit\(log_softmax\))|chunked|/(log_softmax|take_along_axis)"),
    ("attention core", r"self_attn/.*(blockwise|attention|while|dot_general.*bhrd|custom_vjp)"),
    ("attention projections", r"self_attn/"),
    ("Mamba in_proj", r"mamba/in_proj"),
    ("Mamba conv + elementwise", r"mamba/.*(conv|ppermute)|mamba/(mul|add|select_n|concatenate|pad|slice|logistic)"),
    ("Mamba x_proj + dt_proj", r"mamba/(x_proj|dt_|b_layernorm|c_layernorm|dt_layernorm)"),
    ("Mamba scan", r"mamba/.*(shard_map|scan|while|selective|softplus|exp)"),
    ("Mamba out_proj", r"mamba/out_proj"),
    ("MoE router", r"feed_forward/router|top_k|softmax"),
    ("MoE experts (grouped matmul)", r"experts/.*(ragged_dot|dot_general|grouped|gmm)"),
    ("MoE permutation + combine", r"experts/"),
    ("dense MLP", r"feed_forward/"),
    ("norms", r"layernorm|final_layernorm|input_layernorm|pre_ff_layernorm"),
    ("embedding", r"embed_tokens|/take"),
)


def component(source: str) -> str:
    for name, pattern in COMPONENTS:
        if re.search(pattern, source):
            return name
    return "other (residuals, casts, copies)"


CONTAINERS = ("while", "conditional", "call")  # ops whose trace events enclose the events of the ops they run


def op_sources(hlo_text: str) -> dict[str, str]:
    """{HLO instruction name: its op_name metadata (where in the program it came from)}, for the ops that do
    work: a loop's or a call's own event spans its body's events, which are counted on their own."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"", hlo_text, re.M):
        opcode = re.search(r" ([a-z][\w\-]*)\(", m.group(0))
        if opcode is None or opcode.group(1) not in CONTAINERS:
            out[m.group(1)] = m.group(2)
    return out


def profile_breakdown(run, hlo_text: str, steps: int) -> dict[str, float]:
    """Seconds per step by component, from a jax.profiler trace of `steps` runs of `run`."""
    sources = op_sources(hlo_text)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        path = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    totals: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name = e.get("name", "")
        src = sources.get(name) or sources.get(name.split(":")[0])
        if src is not None:
            totals[component(src)] += e["dur"] * 1e-6 / steps
    return dict(totals)


def plot(breakdown: dict[str, float], step_s: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(breakdown.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(items) + 1.2))
    ax.barh([k for k, _ in items], [v * 1e3 for _, v in items], color="#4477aa")
    ax.set_xlabel(f"ms per step (op time summed over threads; the step takes {step_s * 1e3:,.0f} ms)")
    ax.set_title("A train step's time by component (hidden 1024, CPU, float32)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    config = jamba_tiny.get_config()
    config.seq_len, config.batch_size = args.seq_len, args.batch
    for k, v in mfu_config().items():
        config.model[k] = v
    task, optimizer = JambaLMTask(config), make_optimizer(config)
    cfg = task.cfg
    state = jax.jit(lambda r: init_state(task, optimizer, r))(jax.random.PRNGKey(0))
    ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
    batch = {"inputs": ids, "segment_ids": np.ones_like(ids)}
    compiled = jax.jit(make_train_step(task, optimizer, 1), donate_argnums=(0,)).lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    holder = {"state": state}

    def run():
        holder["state"], m = jax.block_until_ready(compiled(holder["state"], batch))

    step_s = time_fn(run, warmup=1, repeats=args.repeats)
    peak = matmul_peak()
    flops = train_flops(cfg, args.batch, args.seq_len)
    breakdown = profile_breakdown(run, compiled.as_text(), steps=2)
    plot(breakdown, step_s, FIGURE)
    body = report(args, cfg, step_s, peak, flops, cost, breakdown)
    write_section("mfu", body)
    print(body)


def report(args, cfg, step_s: float, peak: float, flops: dict, cost: dict, breakdown: dict) -> str:
    """The BENCHMARKS.md section."""
    model_flops, profiled = sum(flops.values()), sum(breakdown.values())
    rows = "\n".join(f"| {k} | {v * 1e3:,.1f} | {v / profiled:.1%} |"
                     for k, v in sorted(breakdown.items(), key=lambda kv: -kv[1]))
    return f"""## MFU at hidden 1024: a train step against the matmul peak (issue 32)

`python -m benchmarks.mfu --batch {args.batch} --seq_len {args.seq_len} --repeats {args.repeats}` ({machine()}).
The Jamba layer pattern at hidden 1024 (8 layers: attention at layer 4, 4 experts top-2 at odd layers, Mini's
ratios: 8 heads of 128 over 2 KV heads, expert/MLP hidden 3584, d_inner 2048, d_state 16; vocab 2048; float32;
{sum(int(np.prod(x.shape)) for _, x in flat_items(abstract_params(cfg))) / 1e6:,.1f}M parameters), one full train step (forward, chunked loss,
backward, AdamW) on {args.batch} x {args.seq_len:,} tokens, median of {args.repeats} steps.

| quantity | value |
| --- | --- |
| step time | {step_s * 1e3:,.0f} ms |
| model FLOPs per step (3 x forward; formula in `train_flops`) | {model_flops / 1e9:,.1f} G: matmuls {flops['matmul'] / 1e9:,.1f}, attention {flops['attention'] / 1e9:,.2f}, scan {flops['scan'] / 1e9:,.2f}, conv {flops['conv'] / 1e9:,.2f} |
| XLA's cost analysis of the compiled step | {cost.get('flops', float('nan')) / 1e9:,.1f} G ({cost.get('flops', float('nan')) / model_flops:.2f}x the formula; see below) |
| float32 matmul peak (2048^3 `jnp.dot`, same process) | {peak / 1e9:,.1f} GFLOP/s |
| achieved | {model_flops / step_s / 1e9:,.1f} GFLOP/s |
| **MFU** | **{model_flops / step_s / peak:.1%}** (target 40%) |

XLA's CPU cost analysis counts a while loop's body once (a 4-step `lax.scan` of a matmul reports 0.25x its
FLOPs), so it undercounts every loop of the step: the grouped expert matmul's, the scan's chunks, the chunked
loss, the attention blocks; it also counts elementwise work the formula leaves out. The formula is the
yardstick; the cost analysis bounds it from below for the loop-free part.

Where the time goes (a jax.profiler trace of 2 steps; each XLA op's time, summed over the threads that ran
it, assigned by the op's source in the program; {profiled * 1e3:,.0f} ms of op time per step against a
{step_s * 1e3:,.0f} ms step on 2 cores), `benchmarks/figures/mfu.png`:

| component | ms per step | share |
| --- | --- | --- |
{rows}
"""


if __name__ == "__main__":
    main()
