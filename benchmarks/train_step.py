"""Training-step tokens/s of our tiny Jamba vs a transformers JambaForCausalLM training step:
same config, same batch and sequence length, AdamW, same CPU, same process. transformers gets its
fastest CPU path: `use_mambapy=True` with the mambapy package (parallel scan).

  python -m benchmarks.train_step [--batch 16 --seq_len 128]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks.common import (  # noqa: E402
    MODEL_NAMES,
    add_model_arg,
    machine,
    model_config,
    time_fn,
    torch_train_step,
    write_section,
)
from tasks.jamba_lm import JambaLMTask  # noqa: E402
from training.optim import make_optimizer  # noqa: E402
from training.step import init_state, make_train_step  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    add_model_arg(parser)
    args = parser.parse_args(argv)

    config = model_config(args.model)
    task = JambaLMTask(config)
    cfg = task.cfg
    ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
    batch = {"inputs": ids, "segment_ids": np.ones_like(ids)}
    optimizer = make_optimizer(config)
    state = jax.jit(lambda r: init_state(task, optimizer, r))(jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(task, optimizer, 1), donate_argnums=(0,))
    holder = {"state": state}

    def ours():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m["loss"])

    hf_kwargs = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("model_type", "architectures", "dtype")}
    hf_kwargs["use_mambapy"] = True
    torch.manual_seed(0)
    hf = transformers.JambaForCausalLM(transformers.JambaConfig(**hf_kwargs)).train()
    theirs = torch_train_step(hf, hf.parameters(), config, ids)

    t_ours = time_fn(ours, warmup=2, repeats=args.repeats)
    t_hf = time_fn(theirs, warmup=1, repeats=args.repeats)
    tokens = args.batch * args.seq_len
    import mambapy

    body = f"""## Training step against transformers (issues: training stack, 32)

Command: `python -m benchmarks.train_step --batch {args.batch} --seq_len {args.seq_len} --model {args.model}`
Machine: {machine()}; jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__},
mambapy {getattr(mambapy, '__version__', 'installed')}. The {MODEL_NAMES[args.model]}, float32, batch {args.batch} x {args.seq_len}
tokens, one full step each: forward, next-token loss + router aux loss, backward, global-norm clipping,
AdamW update. Median of {args.repeats} after warm-up. transformers uses `use_mambapy=True` (its fastest
CPU training path); ours is the jitted `training.train` step (fused sequential scan, blocked grouped-matmul MoE).

| implementation | seconds / step | tokens / s | ratio |
| --- | ---: | ---: | ---: |
| jamba_jax train step | {t_ours:.4f} | {tokens / t_ours:,.0f} | {t_hf / t_ours:.2f}x |
| transformers + mambapy, torch AdamW | {t_hf:.4f} | {tokens / t_hf:,.0f} | 1.00x |
"""
    print(body)
    write_section("train_step", body)


if __name__ == "__main__":
    main()
