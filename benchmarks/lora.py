"""LoRA training-step tokens/s: our LoRA fine-tuning step (adapters trained, the base a frozen input) vs
transformers + peft on the same model, batch, rank and targets, same CPU, same process. Both start from the
same weights (transformers' tiny JambaForCausalLM, saved and loaded as our `config.init_from`); peft gets
the adapter config our PEFT export writes for these targets (`jamba_jax.peft_adapter.peft_config`), so the
adapted weights, ranks and scales are the same; transformers gets its fastest CPU path (`use_mambapy`).

  python -m benchmarks.lora [--batch 16 --seq_len 128 --rank 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks.common import machine, time_interleaved, torch_train_step, write_section  # noqa: E402
from configs import jamba_tiny  # noqa: E402
from jamba_jax import JambaConfig  # noqa: E402
from jamba_jax.lora import LoraConfig  # noqa: E402
from jamba_jax.peft_adapter import peft_config  # noqa: E402
from tasks.jamba_lm import JambaLMTask  # noqa: E402
from training.optim import make_optimizer  # noqa: E402
from training.step import init_state, make_train_step  # noqa: E402

TARGETS = ("q_proj,k_proj,v_proj,o_proj,in_proj,x_proj,out_proj,gate_proj,up_proj,down_proj,"
           "experts.gate_proj,experts.up_proj,experts.down_proj")  # every target peft can hold


def ours_step(config, ids):
    """A function running one of our LoRA train steps on `ids`, blocking until it is done."""
    task = JambaLMTask(config)
    frozen_inputs = task.frozen_inputs()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    frozen = frozen_inputs.load(jax.tree.map(lambda _: device, frozen_inputs.arrays))
    optimizer = make_optimizer(config)
    state = {"state": jax.jit(lambda r: init_state(task, optimizer, r))(jax.random.PRNGKey(0))}
    step = jax.jit(make_train_step(task, optimizer, 1), donate_argnums=(0,))
    batch = {"inputs": ids, "segment_ids": np.ones_like(ids)}

    def run():
        state["state"], m = step(state["state"], batch, frozen)
        jax.block_until_ready(m["loss"])

    return run, task


def theirs_step(hf, config, lora, ids):
    """The same step in transformers + peft: forward with router logits, backward, clipping, AdamW on the
    adapters."""
    import peft

    fields = peft_config(lora, "")
    fields = {k: v for k, v in fields.items() if k not in ("peft_type", "base_model_name_or_path", "inference_mode")}
    model = peft.get_peft_model(hf, peft.LoraConfig(**fields)).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    run = torch_train_step(model, trainable, config, ids)
    return run, sum(p.numel() for p in trainable)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)

    config = jamba_tiny.get_config()
    cfg = JambaConfig.from_dict(config.model.to_dict())
    hf_kwargs = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("model_type", "architectures", "dtype")}
    torch.manual_seed(0)
    hf = transformers.JambaForCausalLM(transformers.JambaConfig(**{**hf_kwargs, "use_mambapy": True}))
    ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        config.init_from, config.lora.rank, config.lora.alpha = d, args.rank, 2.0 * args.rank
        config.lora.targets = TARGETS
        ours, task = ours_step(config, ids)
        lora = LoraConfig.from_config(config.lora)
        theirs, n_trainable = theirs_step(hf, config, lora, ids)
        t_ours, t_hf = time_interleaved([ours, theirs], warmup=2, rounds=args.repeats)
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(task.init_params(jax.random.PRNGKey(0))))
    tokens = args.batch * args.seq_len
    import peft

    body = f"""## LoRA training step, tiny Jamba (issue: fine-tuning a released Jamba)

Command: `python -m benchmarks.lora --batch {args.batch} --seq_len {args.seq_len} --rank {args.rank}`
Machine: {machine()}; jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__},
peft {peft.__version__}. Tiny config (`configs/jamba_tiny.py`), float32, batch {args.batch} x {args.seq_len} tokens,
rank {args.rank} on {len(lora.targets)} targets (every one peft can hold: attention, Mamba in/x/out, dense MLP,
experts; {n_ours:,} adapter parameters here, {n_trainable:,} trainable in peft: the same adapters, peft's fused
gate_up_proj holding gate's and up's as one rank-{2 * args.rank} block). One full step each: forward (base +
adapters), next-token loss + router aux loss, backward, clipping, AdamW on the adapters. Median of
{args.repeats} rounds after warm-up, the two steps alternating (this VM has slow phases of several seconds,
which otherwise land on one side); transformers with `use_mambapy=True`.

| implementation | seconds / step | tokens / s | ratio |
| --- | ---: | ---: | ---: |
| jamba_jax LoRA step (frozen base) | {t_ours:.4f} | {tokens / t_ours:,.0f} | {t_hf / t_ours:.2f}x |
| transformers + peft, torch AdamW | {t_hf:.4f} | {tokens / t_hf:,.0f} | 1.00x |
"""
    print(body)
    write_section("lora", body)


if __name__ == "__main__":
    main()
