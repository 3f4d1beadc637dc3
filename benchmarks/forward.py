"""Forward tokens/s of our tiny Jamba vs transformers' JambaForCausalLM: same config, same random
weights (loaded through our HF converter), same batch, same CPU, same process.

  python -m benchmarks.forward [--batch 4 --seq_len 512]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import jamba_jax  # noqa: E402
from benchmarks.common import MODEL_NAMES, add_model_arg, machine, time_fn, tiny_models, write_section  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    add_model_arg(parser)
    args = parser.parse_args(argv)

    hf, cfg, params = tiny_models(args.model)

    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq_len))
    model = jamba_jax.JambaForCausalLM(cfg)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
    ids_j, ids_t = jnp.asarray(ids), torch.tensor(ids)
    ours = fwd(params, ids_j)
    with torch.inference_mode():
        theirs = hf(ids_t).logits.numpy()
    max_diff = float(np.abs(np.asarray(ours) - theirs).max())

    t_ours = time_fn(lambda: fwd(params, ids_j).block_until_ready(), repeats=args.repeats)

    def torch_fwd():
        with torch.inference_mode():
            hf(ids_t)

    t_hf = time_fn(torch_fwd, repeats=args.repeats)
    tokens = args.batch * args.seq_len
    body = f"""## Forward pass against transformers (issues: model parity, 32)

Command: `python -m benchmarks.forward --batch {args.batch} --seq_len {args.seq_len} --model {args.model}`
Machine: {machine()}; jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}.
The {MODEL_NAMES[args.model]}, {jamba_jax.count_params(cfg)['total']:,} parameters, float32, same weights,
batch {args.batch} x {args.seq_len} tokens, median of {args.repeats} runs after warm-up. transformers runs its
PyTorch path (no mamba_ssm / causal_conv1d kernels exist for CPU). Max |logit difference|: {max_diff:.1e}.

| implementation | seconds / forward | tokens / s | ratio |
| --- | ---: | ---: | ---: |
| jamba_jax (jit, `scan_impl=auto` -> fused sequential loop) | {t_ours:.4f} | {tokens / t_ours:,.0f} | {t_hf / t_ours:.2f}x |
| transformers JambaForCausalLM | {t_hf:.4f} | {tokens / t_hf:,.0f} | 1.00x |
"""
    print(body)
    write_section("forward", body)


if __name__ == "__main__":
    main()
