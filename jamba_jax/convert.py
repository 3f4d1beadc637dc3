"""Convert Jamba checkpoints between a Hugging Face directory and an orbax checkpoint.

  python -m jamba_jax.convert hf-to-orbax --src HF_DIR --dst ORBAX_DIR [--param_dtype bfloat16]
  python -m jamba_jax.convert orbax-to-hf --src ORBAX_DIR --dst HF_DIR [--max_shard_gb 5] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import sys

from jamba_jax.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from jamba_jax.orbax_io import load_params, save_params
from jamba_jax.params import format_param_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jamba_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=["hf-to-orbax", "orbax-to-hf"])
    parser.add_argument("--src", required=True, help="directory to read")
    parser.add_argument("--dst", required=True, help="directory to write")
    parser.add_argument("--param_dtype", default=None, help="parameter dtype after loading (default: keep)")
    parser.add_argument("--dtype", default=None, help="orbax-to-hf: dtype of the written tensors")
    parser.add_argument("--max_shard_gb", type=float, default=5.0, help="orbax-to-hf: shard size limit")
    args = parser.parse_args(argv)
    overrides = {} if args.param_dtype is None else {"param_dtype": args.param_dtype}
    if args.direction == "hf-to-orbax":
        cfg, params = load_hf_checkpoint(args.src, **overrides)
        save_params(cfg, params, args.dst)
    else:
        cfg, params = load_params(args.src, **overrides)
        save_hf_checkpoint(cfg, params, args.dst, max_shard_bytes=int(args.max_shard_gb * 1024**3), dtype=args.dtype)
    print(format_param_table(cfg))
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
