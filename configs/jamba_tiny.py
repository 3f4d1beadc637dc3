"""The CPU default: a tiny Jamba (about 3M parameters) with the real model's layer pattern."""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.task = "jamba_lm"  # which task main.py runs
    config.seed = 0  # PRNG seed for init and data order
    config.batch_size = 4  # sequences per forward pass
    config.seq_len = 128  # tokens per sequence

    model = ml_collections.ConfigDict()  # JambaConfig fields; anything not set takes its default
    model.vocab_size = 2048  # tiny BPE vocabulary
    model.hidden_size = 128  # d_model
    model.intermediate_size = 256  # SwiGLU / expert hidden size
    model.num_hidden_layers = 8  # one Jamba block: attention at layer 4, Mamba elsewhere (1:7)
    model.num_attention_heads = 4  # query heads
    model.num_key_value_heads = 2  # grouped-query attention
    model.num_experts = 4  # experts per MoE layer
    model.num_experts_per_tok = 2  # top-k
    model.attn_layer_period = 8  # attention every 8 layers ...
    model.attn_layer_offset = 4  # ... at layer 4 (as in Jamba)
    model.expert_layer_period = 2  # MoE every other layer ...
    model.expert_layer_offset = 1  # ... at the odd layers (as in Jamba)
    model.mamba_d_state = 16  # SSM state size
    model.mamba_d_conv = 4  # causal conv width
    model.mamba_expand = 2  # d_inner = 2 * hidden
    model.max_position_embeddings = 4096  # informational: Jamba has no positional embedding
    model.dtype = "float32"  # compute dtype
    model.param_dtype = "float32"  # parameter dtype
    model.scan_impl = "auto"  # selective scan implementation
    model.remat = False  # rematerialise decoder layers
    config.model = model
    return config
