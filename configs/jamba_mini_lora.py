"""LoRA fine-tuning of Jamba-1.5-Mini on chat data: the released weights frozen in bfloat16 (sharded over all
devices), rank-16 adapters in float32 on attention, Mamba's projections, the dense MLPs and every expert
(AI21's LoRA recipe, less dt_proj and the embeddings). The base is 97 GiB in bfloat16: two 80 GB GPUs at the
least (AI21's guidance); jamba_mini_qlora puts it on one.

  python main.py --config=jamba_mini_lora --config.init_from=/path/to/AI21-Jamba-1.5-Mini \\
      --config.data.train_files=train.jsonl --config.data.validation_files=validation.jsonl

Export: `python -m tasks.convert orbax-to-hf --src WORKDIR --dst DIR` (merged, for transformers and vLLM) or
with --adapter (a PEFT adapter; tasks/convert.py).
"""

from configs import jamba_mini_sft


def get_config():
    config = jamba_mini_sft.get_config()
    config.batch_size = 8  # conversations per step
    config.learning_rate = 2e-4  # LoRA: a larger rate than full fine-tuning
    config.warmup_steps = 20  # linear warmup
    config.lora.rank = 16  # adapter rank
    config.lora.alpha = 32.0  # update scale alpha / rank = 2
    config.lora.dropout = 0.05  # on the adapters' input
    config.lora.targets = ("q_proj,k_proj,v_proj,o_proj,in_proj,x_proj,out_proj,gate_proj,up_proj,down_proj,"
                           "experts.gate_proj,experts.up_proj,experts.down_proj")
    config.lora.base_quantize = ""  # the base as released (bfloat16)
    config.model.param_dtype = "bfloat16"  # the frozen base in bfloat16 (the adapters are float32)
    config.mesh.data = 1  # the base sharded over every device (FSDP); the adapters follow their weights
    config.mesh.fsdp = -1
    config.mesh.expert = 1
    return config
