"""JambaConfig: same fields and defaults as transformers', validation, HF dict conversion."""

import dataclasses
import math

import pytest
import transformers

from jamba_jax import ConfigError, JambaConfig


def test_defaults_match_transformers():
    ours, theirs = JambaConfig(), transformers.JambaConfig()
    for name in JambaConfig.hf_field_names():
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.mamba_dt_rank == math.ceil(4096 / 16) == 256


def test_every_transformers_field_exists():
    theirs = set(transformers.JambaConfig.__dataclass_fields__)
    generic = set(transformers.PretrainedConfig.__dataclass_fields__) if dataclasses.is_dataclass(
        transformers.PretrainedConfig) else set()
    missing = sorted(theirs - generic - set(JambaConfig.hf_field_names()))
    assert not missing, missing


def test_layer_schedule_matches_transformers():
    kw = dict(num_hidden_layers=16, attn_layer_period=4, attn_layer_offset=3, expert_layer_period=3,
              expert_layer_offset=1, num_experts=4)
    ours, theirs = JambaConfig(**kw), transformers.JambaConfig(**kw)
    assert ours.layers_block_type == theirs.layers_block_type
    assert ours.layers_num_experts == theirs.layers_num_experts


def test_jamba_1_5_mini_schedule():
    cfg = JambaConfig()
    assert [i for i in range(32) if cfg.is_attention_layer(i)] == [4, 12, 20, 28]
    assert [i for i in range(32) if cfg.is_moe_layer(i)] == list(range(1, 32, 2))


@pytest.mark.parametrize("kwargs, field", [
    (dict(attn_layer_offset=8), "attn_layer_offset"),
    (dict(expert_layer_offset=2), "expert_layer_offset"),
    (dict(num_attention_heads=32, num_key_value_heads=5), "num_key_value_heads"),
    (dict(hidden_size=100, num_attention_heads=32), "num_attention_heads"),
    (dict(num_experts=2, num_experts_per_tok=3), "num_experts_per_tok"),
    (dict(hidden_act="tanhh"), "hidden_act"),
    (dict(dtype="float8"), "dtype"),
    (dict(scan_impl="magic"), "scan_impl"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(pad_token_id=70000), "pad_token_id"),
    (dict(scan_layers=True, num_hidden_layers=12), "scan_layers"),  # not a whole number of 8-layer cycles
])
def test_bad_fields_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        JambaConfig(**kwargs)


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="hiden_size"):
        JambaConfig.from_dict({"hiden_size": 64})
    with pytest.raises(ConfigError, match="not_a_jamba_field"):
        JambaConfig.from_hf_dict({"model_type": "jamba", "not_a_jamba_field": 1})


def test_other_model_type_is_rejected():
    with pytest.raises(ConfigError, match="llama"):
        JambaConfig.from_hf_dict({"model_type": "llama", "hidden_size": 64})


def test_hf_dict_round_trip_through_transformers():
    cfg = JambaConfig(hidden_size=64, num_hidden_layers=4, eos_token_id=[2, 5], mamba_dt_rank="auto")
    d = cfg.to_hf_dict()
    theirs = transformers.JambaConfig(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    back = JambaConfig.from_hf_dict(theirs.to_dict())
    assert back == cfg
    assert back.mamba_dt_rank == 4 and back.eos_token_id == (2, 5)
