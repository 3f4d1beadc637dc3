"""Parameter counts from the config alone match the Jamba-1.5 papers' sizes."""

import pytest

from configs import jamba_large, jamba_mini
from jamba_jax import JambaConfig, count_params


@pytest.mark.parametrize("module, total_b, active_b", [(jamba_mini, 52, 12), (jamba_large, 398, 94)])
def test_jamba_1_5_sizes(module, total_b, active_b):
    c = count_params(JambaConfig.from_dict(module.get_config().model.to_dict()))
    assert abs(c["total"] / 1e9 - total_b) / total_b < 0.02, c
    assert abs(c["active"] / 1e9 - active_b) / active_b < 0.03, c


def test_counts_match_transformers_on_a_small_config():
    import torch
    import transformers

    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=2, num_experts=4, mamba_d_state=8)
    torch.manual_seed(0)
    theirs = sum(p.numel() for p in transformers.JambaForCausalLM(transformers.JambaConfig(**kw)).parameters())
    assert count_params(JambaConfig(**kw))["total"] == theirs
