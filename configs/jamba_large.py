"""Jamba-1.5-Large (about 398B parameters, 94B active)."""

from configs import jamba_mini


def get_config():
    config = jamba_mini.get_config()
    model = config.model  # Jamba-1.5-Large (arXiv 2408.12570): Mini's periods, wider and deeper
    model.hidden_size = 8192  # d_model
    model.intermediate_size = 24576  # expert / MLP hidden size
    model.num_hidden_layers = 72  # 9 Jamba blocks of 8 layers
    model.num_attention_heads = 64  # query heads (head_dim 128)
    model.num_key_value_heads = 8  # GQA
    model.mamba_dt_rank = 512  # ceil(8192 / 16)
    return config
