"""Jamba-1.5-Mini (about 52B parameters, 12B active): the transformers JambaConfig defaults."""

import ml_collections

from configs.common import lm_start_fields, training_config


def get_config():
    config = lm_start_fields(training_config())
    config.num_train_steps = 100_000  # optimizer steps
    config.batch_size = 512  # global batch (sequences)
    config.seq_len = 4096  # tokens per row (2M tokens per step)
    config.learning_rate = 1.5e-4  # peak learning rate
    config.warmup_steps = 2000  # linear warmup
    config.activation_loss_coef = 1e-5  # Jamba-1.5 activation loss
    config.log_every_steps = 50  # metrics cadence
    config.eval_every_steps = 2000  # eval cadence
    config.save_every_steps = 1000  # checkpoint cadence
    config.data.tokenizer = ""  # set to the Jamba tokenizer (tokenizer.json) for real runs
    config.mesh.data = 1  # pod mesh: FSDP over the slice, experts across 8 devices
    config.mesh.fsdp = -1
    config.mesh.expert = 8

    model = ml_collections.ConfigDict()  # Jamba-1.5-Mini (arXiv 2408.12570)
    model.vocab_size = 65536  # tokenizer size
    model.hidden_size = 4096  # d_model
    model.intermediate_size = 14336  # expert / MLP hidden size
    model.num_hidden_layers = 32  # 4 Jamba blocks of 8 layers
    model.num_attention_heads = 32  # query heads (head_dim 128)
    model.num_key_value_heads = 8  # GQA
    model.num_experts = 16  # experts per MoE layer
    model.num_experts_per_tok = 2  # top-2
    model.attn_layer_period = 8  # attention at i % 8 == 4
    model.attn_layer_offset = 4
    model.expert_layer_period = 2  # MoE at odd layers
    model.expert_layer_offset = 1
    model.mamba_d_state = 16  # SSM state size
    model.mamba_d_conv = 4  # conv width
    model.mamba_expand = 2  # d_inner 8192
    model.mamba_dt_rank = 256  # ceil(4096 / 16)
    model.dtype = "bfloat16"  # compute dtype on accelerators
    model.param_dtype = "float32"  # master weights
    model.scan_impl = "auto"  # the Pallas kernel on GPU/TPU, the fused sequential loop on CPU
    model.attention_impl = "auto"  # CPU: blockwise flash attention (XLA); GPU/TPU: the Pallas kernel (common.attention)
    model.remat_policy = "full"  # keep only each layer's input for the backward pass (jamba_jax.remat)
    model.scan_layers = True  # one nn.scan over the repeats of the 8-layer cycle: compile time flat in depth
    config.model = model
    return config
