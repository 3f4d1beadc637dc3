"""Timing and reporting helpers shared by the benchmarks."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")


def time_fn(fn, warmup: int = 1, repeats: int = 5) -> float:
    """Median seconds of `fn()` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_interleaved(fns, warmup: int = 1, rounds: int = 5) -> list[float]:
    """Median seconds of each of `fns` (each blocking until done), timed in alternation, one call of each per
    round: a slow phase of a shared machine then slows every side alike instead of whichever ran in it."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of an elementwise pass over an `nbytes` float32 array, read once and written once, in place (the
    input donated): a fresh output would be first-touched on every call, and on a CPU those page faults, not
    the memory, set the time (4-5 GB/s on this VM's two cores against 31-33 GB/s in place)."""
    import jax
    import jax.numpy as jnp

    fn = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
    buf = [jnp.ones((nbytes // 4,), jnp.float32)]

    def step():
        buf[0] = jax.block_until_ready(fn(buf[0]))

    return 2 * (nbytes // 4) * 4 / time_fn(step, repeats=repeats)


# The benchmark models: the tiny config (`configs/jamba_tiny.py`, 3.4M parameters) and the issue-32 model, the
# tiny config widened to hidden 256 (8 heads over 2 KV heads, MLP 512, tied embeddings; 11.6M parameters).
MODEL_OVERRIDES = {"tiny": {}, "bench": dict(hidden_size=256, intermediate_size=512, num_attention_heads=8,
                                            num_key_value_heads=2, tie_word_embeddings=True)}
MODEL_NAMES = {"tiny": "tiny config (`configs/jamba_tiny.py`)",
               "bench": "benchmark model (the tiny config at hidden 256, `benchmarks.common.MODEL_OVERRIDES`)"}


def add_model_arg(parser, default: str = "bench") -> None:
    parser.add_argument("--model", choices=sorted(MODEL_OVERRIDES), default=default,
                        help="tiny: configs/jamba_tiny.py; bench: the tiny config at hidden 256 (11.6M parameters)")


def model_config(name: str):
    """The ml_collections config of `configs/jamba_tiny.py` with benchmark model `name`'s overrides."""
    from configs import jamba_tiny

    config = jamba_tiny.get_config()
    config.model.update(MODEL_OVERRIDES[name])
    return config


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}{cpu_model()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}")


def cpu_model() -> str:
    """' (the CPU's model name, its widest vector instructions)' from /proc/cpuinfo, '' where there is none: one
    benchmark section's figures compare only on one CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return ""
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    vector = next((label for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")) if flag in flags),
                  None)
    parts = [x for x in (name.group(1).strip() if name else None, vector) if x]
    return f" ({', '.join(parts)})" if parts else ""


def write_section(name: str, body: str) -> None:
    """Replaces (or appends) the section between `<!-- begin:name -->` and `<!-- end:name -->`."""
    text = open(BENCHMARKS_MD).read() if os.path.exists(BENCHMARKS_MD) else "# Benchmarks\n"
    block = f"<!-- begin:{name} -->\n{body.rstrip()}\n<!-- end:{name} -->"
    pattern = re.compile(rf"<!-- begin:{re.escape(name)} -->.*?<!-- end:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    with open(BENCHMARKS_MD, "w") as f:
        f.write(text)


def tiny_models(name: str = "tiny"):
    """transformers' JambaForCausalLM with benchmark model `name` (MODEL_OVERRIDES; torch seed 0), and our
    (cfg, params) loaded from its save_pretrained output: the same weights on both sides."""
    import tempfile

    import torch
    import transformers

    import jamba_jax
    cfg = jamba_jax.JambaConfig.from_dict(model_config(name).model.to_dict())
    hf_kwargs = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("model_type", "architectures", "dtype")}
    torch.manual_seed(0)
    hf = transformers.JambaForCausalLM(transformers.JambaConfig(**hf_kwargs)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        cfg, params = jamba_jax.load_hf_checkpoint(d)
    return hf, cfg, params


def torch_train_step(model, trainable, config, ids):
    """One transformers training step on `ids` as our loop takes it: forward with router logits (next-token
    loss + the router aux loss), backward, global-norm clipping, torch AdamW on `trainable` with the config's
    settings. Returns the function that runs it."""
    import torch

    trainable = list(trainable)
    opt = torch.optim.AdamW(trainable, lr=config.learning_rate, betas=(config.adam_b1, config.adam_b2),
                            weight_decay=config.weight_decay)
    ids_t = torch.tensor(ids, dtype=torch.long)

    def run():
        opt.zero_grad()
        out = model(ids_t, labels=ids_t, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip_norm)
        opt.step()

    return run
