"""Convert Jamba checkpoints between a Hugging Face directory and an orbax checkpoint.

  python -m tasks.convert hf-to-orbax --src HF_DIR --dst ORBAX_DIR [--param_dtype bfloat16]
  python -m tasks.convert orbax-to-hf --src SRC --dst HF_DIR [--step N] [--max_shard_gb 5] [--dtype bfloat16]

SRC is an orbax directory written by hf-to-orbax, or a training workdir of `python main.py` (its
newest intact checkpoint, or --step). Installed, this is `jamba-convert`. Errors in the arguments
print one line and exit with status 2 (--verbose for the traceback).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from common.cli import user_errors, verbose_requested
from jamba_jax import format_param_table, load_checkpoint, load_hf_checkpoint, save_hf_checkpoint
from jamba_jax.orbax_io import save_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=["hf-to-orbax", "orbax-to-hf"])
    parser.add_argument("--src", required=True, help="directory to read")
    parser.add_argument("--dst", required=True, help="directory to write")
    parser.add_argument("--param_dtype", default=None, help="parameter dtype after loading (default: keep)")
    parser.add_argument("--dtype", default=None, help="orbax-to-hf: dtype of the written tensors")
    parser.add_argument("--max_shard_gb", type=float, default=5.0, help="orbax-to-hf: shard size limit")
    parser.add_argument("--step", type=int, default=None, help="orbax-to-hf from a training workdir: which step")
    parser.add_argument("--verbose", action="store_true", help="tracebacks for argument errors too")
    args = parser.parse_args(argv)
    with user_errors(verbose_requested(argv)):
        if args.direction == "hf-to-orbax":
            overrides = {} if args.param_dtype is None else {"param_dtype": args.param_dtype}
            cfg, params = load_hf_checkpoint(args.src, **overrides)
            save_params(cfg, params, args.dst)
        else:
            cfg, params = load_checkpoint(args.src, args.step)
            if args.param_dtype is not None:
                cfg = cfg.replace(param_dtype=args.param_dtype)
                params = jax.tree.map(lambda x: x.astype(cfg.weights_dtype) if x.dtype != jnp.int8 else x, params)
            save_hf_checkpoint(cfg, params, args.dst, max_shard_bytes=int(args.max_shard_gb * 1024**3),
                               dtype=args.dtype)
    print(format_param_table(cfg))
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
