"""The conversion CLI: HF -> orbax -> HF gives back the same tensors; a training workdir converts to
HF; bad arguments are one line and exit status 2."""

import os

import numpy as np
import pytest
from conftest import make_hf_model
from safetensors.numpy import load_file

from jamba_jax import CheckpointError
from jamba_jax.orbax_io import load_params
from tasks.convert import main as convert


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
    with pytest.raises(SystemExit) as exit_info:
        convert(["hf-to-orbax", "--src", hf, "--dst", orbax_dir])
    assert exit_info.value.code == 2
    with pytest.raises(CheckpointError, match="exists already"):  # --verbose: the error itself
        convert(["hf-to-orbax", "--src", hf, "--dst", orbax_dir, "--verbose"])


def test_a_training_workdir_converts_to_hf(tmp_path, capsys):
    """orbax-to-hf reads `python main.py` workdirs (newest step or --step) and writes what
    transformers loads: the same logits as our model on the trained parameters."""
    import jax.numpy as jnp
    import torch
    import transformers
    from test_training import small_config

    import jamba_jax
    import tasks
    from jamba_jax import load_checkpoint

    workdir = str(tmp_path / "run")
    tasks.run(small_config(num_train_steps=4, save_every_steps=2, eval_every_steps=4), workdir)
    for step, dst in ((None, "hf_latest"), (2, "hf_step2")):
        args = ["orbax-to-hf", "--src", workdir, "--dst", str(tmp_path / dst)] + ([] if step is None else
                                                                                  ["--step", str(step)])
        assert convert(args) == 0
        cfg, params = load_checkpoint(workdir, step)
        hf = transformers.JambaForCausalLM.from_pretrained(str(tmp_path / dst)).eval()
        ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 9))
        ours = jamba_jax.JambaForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids)).logits
        with torch.no_grad():
            theirs = hf(torch.tensor(ids)).logits.numpy()
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)
    a, b = (load_file(os.path.join(tmp_path / d, "model.safetensors")) for d in ("hf_latest", "hf_step2"))
    assert any(not np.array_equal(a[k], b[k]) for k in a)  # step 2 and step 4 are different parameters
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        convert(["orbax-to-hf", "--src", workdir, "--dst", str(tmp_path / "x"), "--step", "3"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err and "step 3" in err, err
