"""Convert Jamba checkpoints between a Hugging Face directory and an orbax checkpoint, and export training runs.

  python -m tasks.convert hf-to-orbax --src HF_DIR --dst ORBAX_DIR [--param_dtype bfloat16]
  python -m tasks.convert orbax-to-hf --src SRC --dst HF_DIR [--step N] [--max_shard_gb 5] [--dtype bfloat16]
  python -m tasks.convert orbax-to-hf --src LORA_WORKDIR --dst ADAPTER_DIR --adapter

SRC is an orbax directory written by hf-to-orbax, or a training workdir of `python main.py` (its newest intact
checkpoint, or --step): a LoRA run exports its adapters merged into its base (for transformers and vLLM), or
with --adapter as a PEFT adapter directory (`jamba_jax.peft_adapter`). An export from a workdir also writes the
run's tokenizer (tokenizer.json, and tokenizer_config.json with its chat template) and says which step it
exported. Installed, this is `jamba-convert`. Errors in the arguments print one line and exit with status 2
(--verbose for the traceback).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import jax
import jax.numpy as jnp

from common.cli import user_errors, verbose_requested
from common.tokenizers import BUNDLED_TOKENIZER
from jamba_jax import (
    CheckpointError,
    format_param_table,
    load_checkpoint,
    load_hf_checkpoint,
    locate_checkpoint,
    save_hf_checkpoint,
)
from jamba_jax.checkpoint import checkpoint_tokenizer, load_lora_run
from jamba_jax.orbax_io import save_params
from jamba_jax.peft_adapter import save_peft_adapter


def copy_tokenizer(source, dst: str) -> None:
    """The checkpoint's tokenizer.json (the bundled one when it names none) and the tokenizer_config.json
    beside it, into dst: transformers' AutoTokenizer then loads dst."""
    tokenizer = checkpoint_tokenizer(source) or BUNDLED_TOKENIZER
    if not tokenizer.endswith(".json"):
        return  # a SentencePiece model: transformers reads it by other means
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = os.path.join(os.path.dirname(tokenizer), name) if name != "tokenizer.json" else tokenizer
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(dst, name))


def export(args) -> str:
    """orbax-to-hf (module docstring); returns what was written."""
    source = locate_checkpoint(args.src, args.step)
    step = "" if source.step is None else f" (step {source.step} of {source.path})"
    if args.adapter:
        run = load_lora_run(source)
        if run is None:
            raise CheckpointError(f"{source.description} holds no LoRA adapters (--adapter exports a LoRA run's)")
        cfg, _, adapters, lora = run
        save_peft_adapter(cfg, lora, adapters, args.dst, run_base(source))
        copy_tokenizer(source, args.dst)
        return f"a PEFT adapter{step}"
    cfg, params = load_checkpoint(source)
    if args.param_dtype is not None:
        cfg = cfg.replace(param_dtype=args.param_dtype)
        params = jax.tree.map(lambda x: x.astype(cfg.weights_dtype) if x.dtype != jnp.int8 else x, params)
    save_hf_checkpoint(cfg, params, args.dst, max_shard_bytes=int(args.max_shard_gb * 1024**3), dtype=args.dtype)
    if source.kind == "workdir":
        copy_tokenizer(source, args.dst)
    print(format_param_table(cfg))
    return f"a Hugging Face checkpoint{step}"


def run_base(source) -> str:
    """Where a LoRA run's base came from (a path: adapter_config.json's base_model_name_or_path)."""
    from common.checkpoints import restore_run_params

    record = restore_run_params(source.path, None, source.step)[0]["frozen_inputs"]["source"]
    return record.split(" (step ")[0]


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
    parser.add_argument("--adapter", action="store_true", help="orbax-to-hf from a LoRA run: a PEFT adapter")
    parser.add_argument("--verbose", action="store_true", help="tracebacks for argument errors too")
    args = parser.parse_args(argv)
    with user_errors(verbose_requested(argv)):
        if args.direction == "hf-to-orbax":
            overrides = {} if args.param_dtype is None else {"param_dtype": args.param_dtype}
            cfg, params = load_hf_checkpoint(args.src, **overrides)
            save_params(cfg, params, args.dst)
            print(format_param_table(cfg))
            what = "an orbax checkpoint"
        else:
            what = export(args)
    print(f"wrote {what} to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
