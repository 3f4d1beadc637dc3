"""The conversion CLI: HF -> orbax -> HF gives back the same tensors."""

import os

import numpy as np
import pytest
from conftest import make_hf_model
from safetensors.numpy import load_file

from jamba_jax import CheckpointError
from jamba_jax.convert import main as convert
from jamba_jax.orbax_io import load_params


def test_hf_orbax_hf_round_trip(tmp_path, capsys):
    _, hf = make_hf_model(tmp_path, seed=11)
    orbax_dir, hf2 = str(tmp_path / "orbax"), str(tmp_path / "hf2")
    assert convert(["hf-to-orbax", "--src", hf, "--dst", orbax_dir]) == 0
    assert convert(["orbax-to-hf", "--src", orbax_dir, "--dst", hf2]) == 0
    assert "total" in capsys.readouterr().out
    a, b = load_file(os.path.join(hf, "model.safetensors")), load_file(os.path.join(hf2, "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_orbax_checkpoint_of_another_config_is_rejected(tmp_path):
    _, hf = make_hf_model(tmp_path, seed=12)
    orbax_dir = str(tmp_path / "orbax")
    convert(["hf-to-orbax", "--src", hf, "--dst", orbax_dir])
    import json

    p = os.path.join(orbax_dir, "jamba_config.json")
    d = json.load(open(p))
    d["intermediate_size"] += 4
    json.dump(d, open(p, "w"))
    with pytest.raises(CheckpointError, match="does not match"):
        load_params(orbax_dir)
    with pytest.raises(CheckpointError, match="exists already"):
        convert(["hf-to-orbax", "--src", hf, "--dst", orbax_dir])
