"""The CPU default: a tiny Jamba (3.4M parameters, the real model's layer pattern) trained on the
bundled WordNet corpus with the bundled 2048-token BPE; a few minutes on a 2-core CPU."""

import ml_collections

from configs.common import lm_start_fields, training_config


def get_config():
    config = lm_start_fields(training_config())
    config.num_train_steps = 300  # about 2-3 minutes on 2 CPU cores
    config.batch_size = 16  # packed rows per step
    config.seq_len = 128  # tokens per row
    config.learning_rate = 3e-3  # tiny models like a high rate
    config.warmup_steps = 30  # linear warmup
    config.log_every_steps = 10  # metrics cadence
    config.eval_every_steps = 100  # eval cadence
    config.eval_batches = 8  # validation batches per eval
    config.save_every_steps = 100  # checkpoint cadence
    config.sample_prompt = "dog:"  # greedy sample printed at the end

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
    model.attention_impl = "auto"  # CPU: blockwise flash attention (XLA); GPU/TPU: the Pallas kernel (common.attention)
    model.moe_impl = "auto"  # the experts' grouped matmul (kernels.grouped_matmul): CPU blocked/dense, else ragged
    model.remat_policy = "none"  # what a layer keeps for the backward pass (jamba_jax.remat): none | full | ...
    model.scan_layers = False  # True: one nn.scan over repeats of the 8-layer cycle (jamba_jax.layout)
    config.model = model
    return config
