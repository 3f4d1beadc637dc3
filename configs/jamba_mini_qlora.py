"""LoRA on an ExpertsInt8 Jamba-1.5-Mini: jamba_mini_lora with the frozen base's expert and dense-MLP
weights quantised to int8 as they load (the rest in bfloat16), so that the base, the adapters, their Adam
state and an 8K-token step fit one 80 GB GPU (the README's dry-run table).

  python main.py --config=jamba_mini_qlora --config.init_from=/path/to/AI21-Jamba-1.5-Mini \\
      --config.data.train_files=train.jsonl --config.data.validation_files=validation.jsonl
"""

from configs import jamba_mini_lora


def get_config():
    config = jamba_mini_lora.get_config()
    config.lora.base_quantize = "experts_int8"  # int8 experts and MLPs, per-channel scales (jamba_jax.quantization)
    config.batch_size = 8  # conversations per step ...
    config.grad_accum_steps = 8  # ... one 8K-token row at a time
    config.mesh.fsdp = 1  # one device
    config.mesh.data = -1
    return config
