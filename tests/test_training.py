"""The shared training loop on a very small Jamba: learning, exact resume, gradient accumulation,
metrics, dry run, and the bad inputs it must name."""

import json
import os

import jax
import numpy as np
import pytest

import tasks
from common.tokenizers import TokenizerError
from configs import jamba_mini, jamba_tiny
from tasks.jamba_lm import JambaLMTask
from training import train
from training.checkpoint import CheckpointMismatchError
from training.data import DataError
from training.optim import make_optimizer
from training.step import init_state, make_train_step


def small_config(**overrides):
    c = jamba_tiny.get_config()
    c.model.hidden_size = 32
    c.model.intermediate_size = 48
    c.model.num_hidden_layers = 4
    c.model.num_attention_heads = 4
    c.model.attn_layer_period = 4
    c.model.attn_layer_offset = 2
    c.model.mamba_d_state = 8
    c.batch_size, c.seq_len = 4, 32
    c.num_train_steps, c.warmup_steps, c.learning_rate = 20, 2, 1e-2
    c.log_every_steps, c.eval_every_steps, c.save_every_steps, c.eval_batches = 1, 10, 10, 2
    c.sample_prompt = ""
    for k, v in overrides.items():
        target = c
        *path, last = k.split(".")
        for p in path:
            target = target[p]
        target[last] = v
    return c


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(workdir):
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


def test_training_lowers_the_loss_and_writes_metrics(tmp_path):
    workdir = str(tmp_path)
    tasks.run(small_config(num_train_steps=30, eval_every_steps=30), workdir)
    records = read_metrics(workdir)
    losses = train_losses(workdir)
    # ln(2048) = 7.6 at init; 30 steps of a 32-wide model take off well over half a nat
    assert np.mean([losses[s] for s in range(26, 31)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.5
    for key in ("step", "loss", "learning_rate", "tokens_per_second", "aux_loss", "grad_norm"):
        assert key in records[0], key
    evals = [m for m in records if "eval_loss" in m]
    assert evals and np.isclose(evals[-1]["eval_perplexity"], np.exp(evals[-1]["eval_loss"]), rtol=1e-5)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20", "30"]


def test_resumed_run_reproduces_the_uninterrupted_losses_exactly(tmp_path):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    tasks.run(small_config(), full)
    config = small_config()
    train.run(JambaLMTask(config), config, resumed, stop_after=10)  # "killed" right after step 10
    assert max(train_losses(resumed)) == 10
    tasks.run(small_config(), resumed)
    a, b = train_losses(full), train_losses(resumed)
    assert [a[s] for s in range(11, 21)] == [b[s] for s in range(11, 21)]  # bit for bit


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_usable(tmp_path):
    workdir = str(tmp_path)
    config = small_config()
    train.run(JambaLMTask(config), config, workdir, stop_after=10)
    # what a kill during the step-20 write leaves behind: orbax's temporary directory
    os.makedirs(os.path.join(workdir, "checkpoints", "20.orbax-checkpoint-tmp-1234", "state"))
    tasks.run(small_config(), workdir)
    assert sorted(s for s in train_losses(workdir)) == list(range(1, 21))


@pytest.mark.slow  # about 75 s: two runs
def test_gradient_accumulation_equals_the_larger_batch():
    # The Switch aux loss is a product of per-batch means, so micro-batches change it by design;
    # with it off, accumulation must reproduce the big batch up to float32 summation order.
    config = small_config(**{"model.router_aux_loss_coef": 0.0})
    task = JambaLMTask(config)
    optimizer = make_optimizer(config)
    batch = next(iter(task.train_dataset(0, 1)))
    results = []
    for k in (1, 4):
        state = init_state(task, optimizer, jax.random.PRNGKey(0))
        new_state, metrics = jax.jit(make_train_step(task, optimizer, k))(state, batch)
        results.append((new_state["params"], metrics))
    for params, metrics in results[1:]:
        np.testing.assert_allclose(metrics["loss"], results[0][1]["loss"], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(results[0][0]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_dry_run_of_jamba_mini_reports_52b_parameters(tmp_path, capsys):
    config = jamba_mini.get_config()
    config.dry_run = True
    report = tasks.run(config, str(tmp_path))
    assert abs(report["params"] / 1e9 - 52) < 1
    assert abs(report["opt_state_bytes"] - 2 * report["param_bytes"]) < 1024  # Adam moments (+ step counts)
    assert "dry run: 51," in capsys.readouterr().out
    # the config's mesh (fsdp=-1 x expert=8) on the fewest devices it needs: 8, everything split 8 ways
    assert report["devices"] == 8 and report["mesh"]["expert"] == 8
    assert abs(report["param_bytes_per_device"] - report["param_bytes"] / 8) < 0.01 * report["param_bytes"]
    assert not os.listdir(tmp_path)  # nothing written, nothing allocated


def test_checkpoint_of_a_different_config_is_named(tmp_path):
    workdir = str(tmp_path)
    config = small_config(num_train_steps=10)
    tasks.run(config, workdir)
    with pytest.raises(CheckpointMismatchError, match="model.intermediate_size: checkpoint has 48, config has 64"):
        tasks.run(small_config(num_train_steps=20, **{"model.intermediate_size": 64}), workdir)


def test_unknown_task_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'jamba_llm'"):
        tasks.run(small_config(task="jamba_llm"), str(tmp_path))


def test_missing_and_empty_data_files_are_named(tmp_path):
    missing = small_config(**{"data.source": "text", "data.train_files": str(tmp_path / "nope.txt")})
    with pytest.raises(DataError, match="nope.txt does not exist"):
        tasks.run(missing, str(tmp_path / "w1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cfg = small_config(**{"data.source": "text", "data.train_files": str(empty), "data.validation_files": str(empty)})
    with pytest.raises(DataError, match="empty.txt holds no documents"):
        tasks.run(cfg, str(tmp_path / "w2"))


def test_tokenizer_larger_than_the_vocabulary_is_named(tmp_path):
    with pytest.raises(TokenizerError, match="2048 tokens but the vocabulary of the model has 1000"):
        tasks.run(small_config(**{"model.vocab_size": 1000}), str(tmp_path))


def test_missing_config_field_is_named(tmp_path):
    config = small_config()
    del config["eval_batches"]
    with pytest.raises(train.ConfigFieldError, match="eval_batches"):
        tasks.run(config, str(tmp_path))
