"""Auxiliary tuning of Jamba-1.5-Mini (frozen, 52B) with a ~1B auxiliary Jamba, on a pod mesh:

  python main.py --config=configs/aux_tuning_mini.py --workdir=/mnt/bucket/aux-mini \
      --config.frozen_lm=/mnt/bucket/Jamba-1.5-Mini --config.data.tokenizer=/mnt/bucket/Jamba-1.5-Mini/tokenizer.json \
      --config.distributed.initialize=True

The frozen LM is sharded by its own specs over the same mesh (fsdp x expert, as training Mini would);
only the auxiliary model has gradients and optimizer state (about 12 GiB of it in float32 + Adam).
"""

from configs import aux_tuning_tiny


def get_config():
    config = aux_tuning_tiny.get_config()
    config.frozen_lm = ""  # a Jamba-1.5-Mini HF directory (or a converted orbax dir)
    config.frozen_lm_quantize = ""  # "experts_int8" halves the frozen experts' memory
    config.num_train_steps = 20_000  # optimizer steps
    config.batch_size = 256  # documents per step
    config.seq_len = 2048  # tokens per document row
    config.learning_rate = 3e-4  # peak learning rate
    config.warmup_steps = 500  # linear warmup
    config.eval_every_steps = 1000  # eval cadence
    config.save_every_steps = 1000  # checkpoint cadence
    config.aux.feature_layers = (15,)  # the frozen LM's middle layer feeds the auxiliary model
    config.aux.eval_samples = 256  # held-out documents for the keyword rate
    config.mesh.data = 1  # no pure data parallelism ...
    config.mesh.fsdp = -1  # ... ZeRO-3 over the rest ...
    config.mesh.expert = 8  # ... and the frozen LM's experts split 8 ways

    model = config.model  # a ~1B auxiliary Jamba: 8 layers of Mini's pattern at half its width
    model.hidden_size = 2048  # d_model
    model.intermediate_size = 5632  # expert / MLP hidden size
    model.num_hidden_layers = 8  # one 8-layer cycle: attention at layer 4
    model.num_attention_heads = 16  # query heads
    model.num_key_value_heads = 4  # GQA
    model.attn_layer_period = 8  # attention every 8 layers ...
    model.attn_layer_offset = 4  # ... at layer 4
    model.num_experts = 4  # MoE at odd layers ...
    model.num_experts_per_tok = 2  # ... top-2
    model.dtype = "bfloat16"  # compute dtype on the accelerators
    model.remat_policy = "full"  # keep only each layer's input for the backward pass (jamba_jax.remat)
    return config
