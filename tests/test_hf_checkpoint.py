"""HF checkpoint loading and saving: sharded layouts and every kind of bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model, random_ids
from safetensors.numpy import load_file, save_file

import jamba_jax
from jamba_jax import CheckpointError, ConfigError, TokenIdError


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A transformers checkpoint re-saved by us in several shards, with its config and params."""
    tmp = tmp_path_factory.mktemp("ckpt")
    _, path = make_hf_model(tmp)
    cfg, params = jamba_jax.load_hf_checkpoint(path)
    out = str(tmp / "sharded")
    jamba_jax.save_hf_checkpoint(cfg, params, out, max_shard_bytes=40_000)
    return cfg, params, out


def copy_dir(src, dst):
    os.makedirs(dst)
    for f in os.listdir(src):
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
            b.write(a.read())
    return str(dst)


def test_sharded_checkpoint_loads_identically(sharded):
    cfg, params, path = sharded
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
    cfg2, params2 = jamba_jax.load_hf_checkpoint(path)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(params) == jax.tree.structure(params2)


def test_bfloat16_params_load_and_save(sharded, tmp_path):
    cfg, _, path = sharded
    cfg16, params16 = jamba_jax.load_hf_checkpoint(path, param_dtype="bfloat16")

    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
    out = str(tmp_path / "bf16")
    jamba_jax.save_hf_checkpoint(cfg16, params16, out)
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    _, again = jamba_jax.load_hf_checkpoint(out, param_dtype="bfloat16")
    for a, b in zip(jax.tree.leaves(params16), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_other_model_type(sharded, tmp_path):
    path = copy_dir(sharded[2], tmp_path / "llama")
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ConfigError, match="model_type='llama'"):
        jamba_jax.load_hf_checkpoint(path)


def test_missing_shard(sharded, tmp_path):
    path = copy_dir(sharded[2], tmp_path / "missing_shard")
    second = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(path, second))
    with pytest.raises(CheckpointError, match="missing.*model-00002"):
        jamba_jax.load_hf_checkpoint(path)


def test_no_weights_at_all(tmp_path):
    os.makedirs(tmp_path / "empty")
    json.dump(jamba_jax.JambaConfig(hidden_size=64).to_hf_dict(), open(tmp_path / "empty" / "config.json", "w"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        jamba_jax.load_hf_checkpoint(str(tmp_path / "empty"))


def single_file_copy(tmp_path, sharded, name):
    cfg, params, _ = sharded
    path = str(tmp_path / name)
    jamba_jax.save_hf_checkpoint(cfg, params, path)
    return path, os.path.join(path, "model.safetensors")


def test_missing_key(sharded, tmp_path):
    path, f = single_file_copy(tmp_path, sharded, "missing_key")
    tensors = load_file(f)
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing keys \['model.layers.1.self_attn.q_proj.weight'\]"):
        jamba_jax.load_hf_checkpoint(path)


def test_unexpected_key(sharded, tmp_path):
    path, f = single_file_copy(tmp_path, sharded, "unexpected_key")
    tensors = load_file(f)
    tensors["model.layers.0.mamba.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected keys \['model.layers.0.mamba.extra.weight'\]"):
        jamba_jax.load_hf_checkpoint(path)


def test_shape_that_does_not_match_config(sharded, tmp_path):
    path, _ = single_file_copy(tmp_path, sharded, "bad_shape")
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["intermediate_size"] += 8
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"has shape \(\d+, \d+\), the config implies"):
        jamba_jax.load_hf_checkpoint(path)


def test_truncated_safetensors(sharded, tmp_path):
    path, f = single_file_copy(tmp_path, sharded, "truncated")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        jamba_jax.load_hf_checkpoint(path)


def test_garbage_header(sharded, tmp_path):
    path, f = single_file_copy(tmp_path, sharded, "garbage")
    open(f, "wb").write(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        jamba_jax.load_hf_checkpoint(path)


def test_saving_params_that_do_not_match_config(sharded, tmp_path):
    cfg, params, _ = sharded
    with pytest.raises(CheckpointError, match="the config implies"):
        jamba_jax.save_hf_checkpoint(cfg.replace(intermediate_size=cfg.intermediate_size + 1), params, str(tmp_path))


def test_token_ids_outside_vocabulary(sharded):
    cfg, params, _ = sharded
    model = jamba_jax.JambaForCausalLM(cfg)
    ids = random_ids((1, 5), cfg.vocab_size)
    for bad in (cfg.vocab_size, -1):
        ids[0, 2] = bad
        with pytest.raises(TokenIdError, match=str(bad)):
            model.apply({"params": params}, jnp.asarray(ids))
