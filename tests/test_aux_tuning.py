"""Auxiliary tuning: the combined model's algebra, the frozen LM kept out of training state, cached
generation, exact resume, the keyword inclusion rate a short run reaches, and the bad inputs."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_training import read_metrics, small_config, train_losses

import jamba_jax
import tasks
from aux_tuning import AuxTunedLM, AuxTuningError, contains_keywords, content_words, keyword_block
from aux_tuning.model import bag_logits, keyword_bag
from common.checkpoints import directory_digest
from configs import aux_tuning_tiny
from jamba_jax import load_checkpoint
from tasks.aux_tuning import AuxTuningTask
from training import train
from training.checkpoint import CheckpointMismatchError

LM = jamba_jax.JambaConfig(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, num_experts=4, attn_layer_period=2,
                           attn_layer_offset=1, mamba_d_state=8, mamba_dt_rank=4)
AUX = LM.replace(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_experts=1, num_experts_per_tok=1,
                 num_attention_heads=2, num_key_value_heads=1, mamba_dt_rank=2)


def random_variables(model, seed=0, head_scale=0.1):
    """LM and auxiliary parameters, the auxiliary head moved off zero so its logits are non-trivial."""
    aux = model.init_aux(jax.random.PRNGKey(seed + 1))
    body = aux["model"]
    if "lm_head" in body:
        body["lm_head"] = head_scale * jax.random.normal(jax.random.PRNGKey(seed + 2), body["lm_head"].shape)
    body["model"]["final_layernorm"]["scale"] = jnp.ones_like(body["model"]["final_layernorm"]["scale"])
    if "bag_scale" in aux:
        aux["bag_scale"] = head_scale * jnp.ones_like(aux["bag_scale"])
    return {"lm": jamba_jax.init_params(model.cfg, jax.random.PRNGKey(seed)), "aux": aux}


@pytest.mark.parametrize("feature_layers", [(), (1, 3)])
def test_combined_logits_are_the_sum_and_start_as_the_lm(feature_layers):
    model = AuxTunedLM(LM, AUX, feature_layers, keyword_bag=True)
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 97, (2, 9)))
    kw, kw_mask = keyword_block([[5, 6], [7]], 4)
    lm_params = jamba_jax.init_params(LM, jax.random.PRNGKey(0))
    lm_alone = jax.jit(jamba_jax.JambaForCausalLM(LM).apply)({"params": lm_params}, ids).logits
    at_init = {"lm": lm_params, "aux": model.init_aux(jax.random.PRNGKey(1))}
    apply = jax.jit(lambda v, x, k, m: model.apply({"params": v}, x, keyword_ids=k, keyword_mask=m))
    out = apply(at_init, ids, kw, kw_mask)
    # every auxiliary term is exactly 0 at init: the combined logits are the LM's, bit for bit (the LM's
    # own logits match a separate forward to float32 rounding: two programs fuse differently)
    assert not np.asarray(out.aux_logits).any()
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(out.lm_logits.astype(jnp.float32)))
    np.testing.assert_allclose(np.asarray(out.lm_logits), np.asarray(lm_alone), rtol=0, atol=1e-6)

    variables = random_variables(model)
    out = apply(variables, ids, kw, kw_mask)
    aux_alone = jamba_jax.JambaForCausalLM(AUX)
    if not feature_layers:  # the auxiliary model reads [keywords][text]; its text positions add to the LM's
        full = jax.jit(aux_alone.apply)({"params": variables["aux"]["model"]}, jnp.concatenate([kw, ids], 1),
                                        attention_mask=jnp.concatenate([kw_mask, jnp.ones_like(ids)], 1)).logits
        bag = bag_logits(variables["aux"], keyword_bag(variables["aux"]["model"], kw, kw_mask))[:, None]
        np.testing.assert_allclose(np.asarray(out.aux_logits), np.asarray(full[:, 4:] + bag), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(out.lm_logits + out.aux_logits))
    assert float(jnp.abs(out.aux_logits).max()) > 0.1


def test_keywords_change_the_auxiliary_logits_and_not_the_lms():
    model = AuxTunedLM(LM, AUX, (2,))
    variables = random_variables(model)
    ids = jnp.asarray(np.random.RandomState(1).randint(3, 97, (1, 8)))
    a = model.apply({"params": variables}, ids, keyword_ids=jnp.asarray([[0, 11, 12]]),
                    keyword_mask=jnp.asarray([[0, 1, 1]]))
    b = model.apply({"params": variables}, ids, keyword_ids=jnp.asarray([[0, 0, 40]]),
                    keyword_mask=jnp.asarray([[0, 0, 1]]))
    np.testing.assert_array_equal(np.asarray(a.lm_logits), np.asarray(b.lm_logits))
    assert float(jnp.abs(a.aux_logits - b.aux_logits).max()) > 1e-3


@pytest.mark.parametrize("bag", [False, True])
def test_cached_generation_and_the_chunked_loss_equal_the_full_forward(monkeypatch, bag):
    model = AuxTunedLM(LM, AUX, (1,), keyword_bag=bag)
    variables = random_variables(model)
    ids = jnp.asarray(np.random.RandomState(2).randint(3, 97, (2, 7)))
    kw, kw_mask = keyword_block([[5, 6, 9], [7]], 4)
    full = model.apply({"params": variables}, ids, keyword_ids=kw, keyword_mask=kw_mask).logits
    cache = model.start_cache(variables, kw, kw_mask, max_length=7)
    step = jax.jit(lambda p, c, x: model.apply({"params": p}, x, c, method="decode"))
    for t in range(7):
        out = step(variables, cache, ids[:, t])
        cache = out.cache
        np.testing.assert_allclose(np.asarray(out.logits), np.asarray(full[:, t]), atol=2e-5, rtol=0)
    # the chunked loss (3 positions per chunk) of the combined logits is their cross-entropy
    import common.losses

    monkeypatch.setattr(common.losses, "LOSS_CHUNK_BYTES", 2 * 97 * 4 * 3)
    targets = jnp.roll(ids, -1, axis=1)
    nll = model.apply({"params": variables}, ids, targets, None, kw, kw_mask, method="token_nll")
    want = -jnp.take_along_axis(jax.nn.log_softmax(full, -1), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(nll), np.asarray(want), atol=2e-5, rtol=0)
    # greedy generation through jamba_jax.generate with both caches: each new token is the argmax of the
    # full forward over the prompt and the tokens before it (one forward over the whole sequence checks all)
    tokens = jamba_jax.generate(model, variables, ids[:, :3], max_new_tokens=4,
                                cache=model.start_cache(variables, kw, kw_mask, max_length=7))
    seq = jnp.concatenate([ids[:, :3], jnp.asarray(tokens)], axis=1)
    logits = model.apply({"params": variables}, seq, keyword_ids=kw, keyword_mask=kw_mask).logits
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, 2:6], -1)), tokens)


def test_the_keyword_bag_lm_starts_as_the_lm_and_its_cache_equals_its_loss(monkeypatch):
    """The baselines' bag term (aux_tuning.keyword_bag): zero at the start (the LM's NLL exactly), then
    the cached decode's log-probabilities equal the chunked loss's, and the bag moves them."""
    import common.losses
    from aux_tuning.keyword_bag import KeywordBagLM

    model = KeywordBagLM(LM)
    lm_params = jamba_jax.init_params(LM, jax.random.PRNGKey(3))
    ids = jnp.asarray(np.random.RandomState(4).randint(3, 97, (2, 6)))
    targets = jnp.roll(ids, -1, axis=1)
    kw, kw_mask = keyword_block([[5, 6], [9]], 3)
    monkeypatch.setattr(common.losses, "LOSS_CHUNK_BYTES", 2 * 97 * 4 * 2)  # 2 positions per chunk
    nll = jax.jit(lambda p: model.apply({"params": p}, ids, targets, None, kw, kw_mask, method="token_nll"))
    plain = jamba_jax.JambaForCausalLM(LM).apply({"params": lm_params}, ids, targets, method="token_nll").token_nll
    np.testing.assert_allclose(np.asarray(nll(KeywordBagLM.wrap(lm_params))), np.asarray(plain), atol=2e-5, rtol=0)
    params = {**KeywordBagLM.wrap(lm_params), "bag_scale": 0.5 * jnp.ones((LM.hidden_size,))}
    cache = model.start_cache(params, kw, kw_mask, 2, 6)
    for t in range(5):
        out = model.apply({"params": params}, ids[:, t], cache, method="decode")
        cache = out.cache
        got = -jnp.take_along_axis(jax.nn.log_softmax(out.logits, -1), targets[:, t, None], -1)[:, 0]
        np.testing.assert_allclose(np.asarray(got), np.asarray(nll(params)[:, t]), atol=2e-5, rtol=0)
    assert float(jnp.abs(nll(params) - plain).max()) > 1e-2


def test_the_keyword_lm_baseline_trains_with_and_without_the_bag_term(frozen_lm, tmp_path):
    """configs/keyword_lm_tiny.py fine-tuning the LM a few steps, with the bag term and without: a step-0
    eval row (the LM as it starts), then training rows; the bag adds its gain to the trained parameters."""
    from configs import keyword_lm_tiny
    from tasks.keyword_lm import KeywordLMTask

    for bag in (False, True):
        c = keyword_lm_tiny.get_config()
        c.init_from, c.num_train_steps, c.warmup_steps, c.batch_size, c.seq_len = frozen_lm, 4, 1, 4, 32
        c.log_every_steps, c.eval_every_steps, c.save_every_steps, c.eval_batches = 2, 4, 4, 1
        c.aux.eval_samples, c.aux.sample_tokens, c.aux.keyword_bag = 4, 8, bag
        task = KeywordLMTask(c)
        workdir = str(tmp_path / f"kw{bag}")
        train.run(task, c, workdir)
        rows = read_metrics(workdir)
        assert rows[0]["step"] == 0 and "eval_keyword_rate" in rows[0] and rows[-1]["step"] == 4
        assert any("loss" in r for r in rows)
        assert ("bag_scale" in task.init_params(jax.random.PRNGKey(0))) == bag


def test_config_errors_are_named():
    with pytest.raises(AuxTuningError, match="vocab_size"):
        AuxTunedLM(LM, AUX.replace(vocab_size=98))
    with pytest.raises(AuxTuningError, match="feature layers"):
        AuxTunedLM(LM, AUX, (9,))


def test_keywords_are_content_words_matched_by_lemma():
    text = "mitosis: cell division in which the nucleus divides into nuclei containing chromosomes"
    words = content_words(text, skip=3)
    assert "the" not in words and "which" not in words and "mitosis" not in words and "nucleus" in words
    assert contains_keywords("two stones fell into the rivers", ["stone", "river"])
    assert not contains_keywords("two stones fell", ["stone", "river"])


# --- on the shared loop, over a small trained LM ---------------------------------------------------------
LM_STEPS = 20  # the frozen LM of the mechanics tests: trained only far enough to be a real checkpoint


def train_lm(workdir, steps):
    tasks.run(small_config(num_train_steps=steps, eval_every_steps=steps, save_every_steps=steps, batch_size=16,
                           seq_len=64), workdir)
    return workdir


@pytest.fixture(scope="module")
def frozen_lm(tmp_path_factory):
    return train_lm(str(tmp_path_factory.mktemp("lm")), LM_STEPS)


@pytest.fixture(scope="module")
def trained_lm(tmp_path_factory):
    """An LM trained long enough (200 steps) that its samples are fluent: the keyword-rate outcome needs it."""
    return train_lm(str(tmp_path_factory.mktemp("trained_lm")), 200)


def aux_config(frozen_lm, **overrides):
    c = aux_tuning_tiny.get_config()
    c.frozen_lm = frozen_lm
    c.num_train_steps, c.warmup_steps, c.learning_rate = 12, 2, 1e-2
    c.batch_size, c.seq_len = 8, 48
    c.log_every_steps, c.eval_every_steps, c.save_every_steps, c.eval_batches = 1, 12, 6, 2
    c.sample_keywords = ""
    c.aux.eval_samples, c.aux.sample_tokens = 16, 16
    c.model.intermediate_size = 64
    for k, v in overrides.items():
        target = c
        *path, last = k.split(".")
        for p in path:
            target = target[p]
        target[last] = v
    return c


@pytest.fixture(scope="module")
def full_run(frozen_lm, tmp_path_factory):
    """An uninterrupted 12-step run that reads LM features: (workdir, task, the LM's directory digest before)."""
    before = directory_digest(frozen_lm, None)
    workdir = str(tmp_path_factory.mktemp("aux_full"))
    config = aux_config(frozen_lm, **{"aux.feature_layers": (1,)})
    task = AuxTuningTask(config)
    train.run(task, config, workdir)
    return workdir, task, before


@pytest.fixture(scope="module")
def stopped_run(frozen_lm, tmp_path_factory):
    """The same run left after step 6 (its checkpoint), as if killed there."""
    workdir = str(tmp_path_factory.mktemp("aux_stopped"))
    config = aux_config(frozen_lm, **{"aux.feature_layers": (1,)})
    train.run(AuxTuningTask(config), config, workdir, stop_after=6)
    return workdir


def test_training_keeps_the_lm_frozen_and_out_of_the_checkpoints(frozen_lm, full_run):
    workdir, task, before = full_run
    assert directory_digest(frozen_lm, None) == before  # never written to
    rows = read_metrics(workdir)
    assert any("loss" in r for r in rows) and any("eval_loss" in r and "eval_keyword_rate" in r for r in rows)
    # the step-0 row is the frozen LM alone (every auxiliary output starts at zero)
    assert rows[0]["step"] == 0 and "eval_keyword_rate" in rows[0] and "loss" not in rows[0]
    root = os.path.join(workdir, "checkpoints")
    with ocp.CheckpointManager(root, item_names=("state", "data", "meta"),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        step = mngr.latest_step()
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    assert set(state["params"]) == {"model", "projection"}  # no bag term unless config.aux.keyword_bag
    n_aux = sum(np.asarray(x).size for x in jax.tree.leaves(task.init_params(jax.random.PRNGKey(0))))
    n_opt = sum(np.asarray(x).size for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x))
    assert sum(np.asarray(x).size for x in jax.tree.leaves(state["params"])) == n_aux
    assert n_opt == 2 * n_aux  # Adam's two moments of the auxiliary parameters, none of the LM's
    assert meta["frozen_inputs"]["source"].startswith(os.path.abspath(frozen_lm))
    # the frozen parameters the task holds are bit-identical to the checkpoint's after training
    lm_params = load_checkpoint(frozen_lm)[1]
    for a, b in zip(jax.tree.leaves(task.frozen_inputs().arrays), jax.tree.leaves(lm_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # exact resume is checked by default in test_training and test_faults
def test_resume_reproduces_the_uninterrupted_run(frozen_lm, full_run, stopped_run, tmp_path):
    resumed = str(tmp_path / "resumed")
    shutil.copytree(stopped_run, resumed)
    config = aux_config(frozen_lm, **{"aux.feature_layers": (1,)})
    train.run(AuxTuningTask(config), config, resumed)
    assert train_losses(resumed) == train_losses(full_run[0])


def test_a_resume_against_another_frozen_lm_is_refused(frozen_lm, stopped_run, tmp_path):
    other = train_lm(shutil.copytree(frozen_lm, str(tmp_path / "other_lm")), LM_STEPS + 2)  # two steps more
    workdir = str(tmp_path / "aux")
    shutil.copytree(stopped_run, workdir)
    config = aux_config(other, **{"aux.feature_layers": (1,)})
    with pytest.raises(CheckpointMismatchError, match="frozen_inputs"):
        train.run(AuxTuningTask(config), config, workdir)


@pytest.mark.slow  # 200 LM steps, 300 training steps and 128 samples (5-6 min): an outcome, like BENCHMARKS' figures
def test_a_short_run_raises_the_keyword_rate_above_the_frozen_lms(trained_lm, tmp_path):
    config = aux_config(trained_lm, num_train_steps=300, eval_every_steps=300, save_every_steps=300, batch_size=16,
                        learning_rate=1e-2, **{"aux.min_keywords": 1, "aux.max_keywords": 1, "aux.eval_samples": 128,
                                               "aux.sample_tokens": 24, "aux.keyword_bag": True})
    task = AuxTuningTask(config)
    # the frozen LM alone: at step 0 the combined model is exactly the LM
    lm_rate = task.extra_eval(task.init_params(jax.random.PRNGKey(0)), task.frozen_inputs().arrays)["keyword_rate"]
    metrics = train.run(task, config, str(tmp_path / "aux"))
    # 128 held-out keywords: the LM alone includes none of them (at most 1 on another CPU's rounding); 5 more
    # is far outside the noise of a rate that low (Poisson(1): P(X >= 5) < 0.004); this short run reaches 8
    assert metrics["eval_keyword_rate"] >= lm_rate + 5 / 128, (lm_rate, metrics["eval_keyword_rate"])


def test_bad_inputs_are_named(frozen_lm, tmp_path):
    with pytest.raises(AuxTuningError, match="vocab_size=100"):
        AuxTuningTask(aux_config(frozen_lm, **{"model.vocab_size": 100}))
    with pytest.raises(AuxTuningError, match="not a directory"):
        AuxTuningTask(aux_config(str(tmp_path / "nowhere")))
    # a checkpoint of a model that is not a causal LM (its run says another task)
    fake = str(tmp_path / "not_causal")
    shutil.copytree(frozen_lm, fake)
    for step in os.listdir(os.path.join(fake, "checkpoints")):
        meta_file = os.path.join(fake, "checkpoints", step, "meta", "metadata")
        meta = json.load(open(meta_file))
        meta["task"] = "sensebert_pretrain"
        json.dump(meta, open(meta_file, "w"))
        os.remove(os.path.join(fake, "checkpoints", step, "integrity.json"))
    with pytest.raises(AuxTuningError, match="not a causal language model"):
        AuxTuningTask(aux_config(fake))
    task = AuxTuningTask(aux_config(frozen_lm))
    with pytest.raises(AuxTuningError, match="tokenize to nothing"):
        task.sample(task.init_params(jax.random.PRNGKey(0)), task.frozen_inputs().arrays, [[""]], 0)
