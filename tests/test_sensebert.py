"""SenseBERT: supersenses and A(w) through the lemmatiser, the losses against the paper's
equations in numpy, masking statistics, a short pre-training run that lowers both losses, supersense
tagging after it against the most-frequent-supersense baseline, WiC, and the checkpoint round trip."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tasks
from common.checkpoints import restore_run_params
from common.wordnet import morphy
from configs import sensebert_tagging, sensebert_tiny, sensebert_wic
from sensebert_jax import SUPERSENSES, TokenizerError, WordPieceTokenizer, allowed_supersenses, token_supersense_matrix
from sensebert_jax.checkpoint import PretrainedMismatchError
from sensebert_jax.losses import supersense_loss_sums
from sensebert_jax.masking import choose_masked, pretraining_example, sentence_words
from sensebert_jax.supersenses import allowed_ids
from tasks.sensebert_finetune import SenseBertFinetuneTask
from tasks.sensebert_predict import main as predict_main
from tasks.sensebert_pretrain import SenseBertPretrainTask
from training.data import make_iterator, text_source


def test_supersenses_are_the_45_lexicographer_files_in_order():
    assert len(SUPERSENSES) == 45
    assert SUPERSENSES[:4] == ("adj.all", "adj.pert", "adv.all", "noun.Tops")
    assert (SUPERSENSES[28], SUPERSENSES[29], SUPERSENSES[43], SUPERSENSES[44]) == (
        "noun.time", "verb.body", "verb.weather", "adj.ppl")


def test_allowed_supersenses_go_through_morphy():
    assert morphy("churches", "noun") == ["church"]  # detachment rule
    assert morphy("geese", "noun") == ["goose"]  # exception list
    assert "noun.animal" in allowed_supersenses("dogs")
    assert "noun.animal" in allowed_supersenses("geese") and "noun.animal" in allowed_supersenses("mice")
    assert "verb.cognition" in allowed_supersenses("studied")  # past tense
    assert "verb.motion" in allowed_supersenses("running")
    assert "adj.all" in allowed_supersenses("better")  # better -> good (adj.exc)
    assert allowed_supersenses("children") == ("noun.person",)
    for empty in ("ran", "cat", "the", "which", "##ing", "because"):  # <= 3 characters, stop words, pieces
        assert allowed_supersenses(empty) == (), empty


def test_losses_equal_the_papers_equations():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 45)).astype(np.float32) * 3
    allowed = rng.random((2, 5, 45)) < 0.1
    allowed[0, 0] = False  # an empty A(w): weight 0
    allowed[1, 1, :] = False
    allowed[1, 1, 7] = True  # a single supersense
    weights = np.ones((2, 5), np.float32)
    weights[0, 0] = 0
    la, lr = supersense_loss_sums(jnp.asarray(logits), jnp.asarray(allowed), jnp.asarray(weights))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    exp_a = exp_r = 0.0
    for b in range(2):
        for t in range(5):
            a = np.flatnonzero(allowed[b, t])
            if weights[b, t] == 0 or not len(a):
                continue
            exp_a += -np.log(p[b, t, a].sum())
            exp_r += -np.sum(np.log(p[b, t, a])) / len(a)
    np.testing.assert_allclose([float(la), float(lr)], [exp_a, exp_r], rtol=1e-5)
    g = jax.grad(lambda x: sum(supersense_loss_sums(x, jnp.asarray(allowed), jnp.asarray(weights))))(
        jnp.asarray(logits))
    assert np.all(np.isfinite(g))


def test_masking_statistics():
    tok = WordPieceTokenizer()
    docs = text_source(sensebert_tiny.get_config().data, "validation")[:400]
    rng = np.random.default_rng(0)
    words = masked = ss = 0
    for text in docs:
        ex = pretraining_example(tok, text, 64, rng)
        pieces = [len(p) for _, p in sentence_words(tok, text, 62)]
        starts = 1 + np.cumsum([0] + pieces[:-1])  # each word's first piece, after [CLS]
        words += len(pieces)
        masked += int(np.sum(ex["mlm_weights"][starts] > 0))
        ss += int(ex["ss_weights"].sum())
        assert np.all(ex["ss_allowed"][ex["ss_weights"] > 0].any(-1))
    assert 0.14 < masked / words < 0.19  # 15% budget (rounded), at least one word per sentence
    # single-supersense words first, up to 40% of the budget
    allowed = [(3,)] * 20 + [(3, 4)] * 80
    singles = [np.sum(choose_masked(allowed, np.random.default_rng(i)) < 20) for i in range(300)]
    assert min(singles) >= 6 and 6.5 < np.mean(singles) < 8.5  # 6 preferred + ~1.3 of the other 9 draws
    assert ss > 0


def test_about_one_in_ten_masked_words_is_shown():
    tok = WordPieceTokenizer()
    rng = np.random.default_rng(1)
    chosen = shown = 0
    text = "The quick brown foxes were jumping over several lazy sleeping dogs near the riverbank today"
    for _ in range(600):
        ex = pretraining_example(tok, text, 64, rng)
        m = ex["mlm_weights"] > 0
        starts = np.flatnonzero(np.diff(np.concatenate([[0], m.astype(int)])) == 1)
        chosen += len(starts)
        shown += int(np.sum(ex["input_ids"][starts] != tok.mask_id))
    assert 0.07 < shown / chosen < 0.13


def test_supersense_matrix_rows():
    m = token_supersense_matrix(["[CLS]", "dogs", "##ing", "the", "geese"])
    assert m[0].sum() == 0 and m[2].sum() == 0 and m[3].sum() == 0
    np.testing.assert_allclose(m[1].sum(), 1.0, rtol=1e-6)
    assert m[4, SUPERSENSES.index("noun.animal")] == pytest.approx(1 / len(allowed_ids("geese")))


def _small(config, **overrides):
    config.model.hidden_size = 64
    config.model.num_hidden_layers = 2
    config.model.num_attention_heads = 2
    config.model.intermediate_size = 128
    config.batch_size, config.seq_len = 32, 40
    config.log_every_steps, config.eval_batches = 5, 4
    for k, v in overrides.items():
        config[k] = v
    return config


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sensebert"))
    c = _small(sensebert_tiny.get_config(), num_train_steps=80, warmup_steps=10, learning_rate=2e-3,
               eval_every_steps=80, save_every_steps=80)
    c.sensebert.sample_sentence = ""
    tasks.run(c, workdir)
    return c, workdir


def test_pretraining_lowers_both_losses(pretrained):
    _, workdir = pretrained
    train = [m for m in _metrics(workdir) if "allowed_loss" in m and "eval_loss" not in m]
    first, last = train[0], train[-1]
    assert last["loss"] < first["loss"] - 1.0, (first, last)
    assert last["allowed_loss"] < first["allowed_loss"] - 0.3, (first, last)
    assert last["reg_loss"] < first["reg_loss"], (first, last)


def test_checkpoint_round_trip_and_predict_cli(pretrained, capsys):
    config, workdir = pretrained
    task = SenseBertPretrainTask(config)
    abstract = jax.eval_shape(lambda: task.init_params(jax.random.PRNGKey(0)))
    meta, params, step = restore_run_params(workdir, abstract)
    assert step == 80 and meta["task"] == "sensebert_pretrain"
    logged = [m for m in _metrics(workdir) if "eval_loss" in m][-1]
    nll = tokens = 0.0
    for i, batch in enumerate(make_iterator(task.eval_dataset(0, 1))):
        if i >= config.eval_batches:
            break
        sums = task.eval_sums(params, batch, None)
        nll, tokens = nll + float(sums["loss"]), tokens + float(sums["tokens"])
    np.testing.assert_allclose(nll / tokens, logged["eval_loss"], rtol=1e-5)
    predict_main(["--workdir", workdir, "The dogs were running in the garden."])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith("The dogs[") and "garden[" in out and "the garden" in out


@pytest.mark.slow  # an outcome (about 70 s of fine-tuning)
def test_tagging_after_pretraining_beats_the_most_frequent_supersense(pretrained, tmp_path):
    _, pre_dir = pretrained
    c = _small(sensebert_tagging.get_config(), num_train_steps=250, warmup_steps=10, learning_rate=2e-3,
               eval_every_steps=250, save_every_steps=250, init_checkpoint=pre_dir, seq_len=80)
    c.eval_batches = 12
    metrics = tasks.run(c, str(tmp_path))
    task = SenseBertFinetuneTask(c)
    label, baseline = task.baseline(max_rows=c.eval_batches * c.batch_size)
    assert metrics["eval_accuracy"] > baseline + 0.05, (metrics["eval_accuracy"], label, baseline)


def test_wic_runs_and_a_mismatched_encoder_is_named(pretrained, tmp_path):
    _, pre_dir = pretrained
    c = _small(sensebert_wic.get_config(), num_train_steps=3, eval_every_steps=3, save_every_steps=3,
               init_checkpoint=pre_dir, seq_len=96)
    c.eval_batches = 2
    metrics = tasks.run(c, str(tmp_path / "wic"))
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    other = _small(sensebert_tagging.get_config(), init_checkpoint=pre_dir)
    other.model.hidden_size = 32
    with pytest.raises(PretrainedMismatchError, match="hidden_size"):
        SenseBertFinetuneTask(other)


def test_vocabularies_whole_words_and_bad_files(tmp_path):
    tok = WordPieceTokenizer()
    assert len(dict(tok.words("happily"))["happily"]) > 1  # not in the 4096-piece vocabulary
    whole = WordPieceTokenizer(whole_words=["happily", "Happily"])
    assert whole.vocab_size == tok.vocab_size + 1 and dict(whole.words("happily"))["happily"] == [tok.vocab_size]
    bad = tmp_path / "vocab.txt"
    bad.write_text("[PAD]\n[UNK]\nthe\n")
    with pytest.raises(TokenizerError, match=r"lacks the special token \[CLS\]"):
        WordPieceTokenizer(str(bad))
    with pytest.raises(TokenizerError, match="no such vocabulary file"):
        WordPieceTokenizer(str(tmp_path / "missing.txt"))


def test_input_embedding_adds_the_mean_supersense_embedding_and_heads_are_tied():
    from sensebert_jax import SenseBertConfig
    from sensebert_jax.model import SenseBertEncoder, SenseBertForPretraining

    cfg = SenseBertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=16, max_position_embeddings=8, hidden_dropout_prob=0.0)
    ids = jnp.asarray([[3, 5]])
    m = np.zeros((10, 45), np.float32)
    m[3, [4, 9]] = 0.5
    model = SenseBertForPretraining(cfg)
    params = model.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids), jnp.zeros_like(ids), jnp.asarray(m))["params"]
    params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
    enc = params["encoder"]
    assert set(params) == {"encoder", "mlm_bias", "mlm_dense", "mlm_layer_norm", "supersense_dense",
                           "supersense_layer_norm"}  # no separate output matrices: tied to W and S

    def embedded(p, mat):  # the encoder's output: a function of the input embedding alone
        return SenseBertEncoder(cfg).apply({"params": p}, ids, jnp.ones_like(ids), jnp.zeros_like(ids), mat)[0]

    # the embedding of token 3 moves by exactly the mean of S[4] and S[9] (before the LayerNorm):
    # set S to zero except those rows and compare with S = 0 plus the same vector added to W[3]
    s = np.zeros((45, 8), np.float32)
    s[4], s[9] = np.arange(8), -2 * np.arange(8) + 1
    with_s = {**enc, "supersense_embeddings": jnp.asarray(s)}
    w = np.asarray(enc["word_embeddings"]).copy()
    w[3] += 0.5 * (s[4] + s[9])
    moved = {**enc, "supersense_embeddings": jnp.zeros((45, 8)), "word_embeddings": jnp.asarray(w)}
    np.testing.assert_allclose(embedded(with_s, jnp.asarray(m)), embedded(moved, jnp.asarray(m)), atol=1e-5)
    assert not np.allclose(embedded(with_s, jnp.asarray(m)), embedded(enc, jnp.asarray(m)), atol=1e-3)


def test_egal_runner_embeds_target_words_with_the_sensebert_encoder(pretrained, tmp_path):
    """configs/egal_wsd.py with config.encoder='sensebert': the pre-trained encoder's output at the target
    word's last piece (one row of hidden_size per example, the same word in other contexts embedded
    differently), a run on one pseudo-word pool whose results name the encoder."""
    from configs import egal_wsd
    from sensebert_jax.encoder import sensebert_encoder

    config, workdir = pretrained
    embed, name = sensebert_encoder(workdir)
    texts = ["the river was wide", "the river was wide", "a river of words poured out"]
    spans = [(4, 9), (4, 9), (2, 7)]
    e = embed(texts, spans)
    assert e.shape == (3, config.model.hidden_size) and np.isfinite(e).all()
    np.testing.assert_array_equal(e[0], e[1])
    assert np.abs(e[0] - e[2]).max() > 1e-3
    c = egal_wsd.get_config()
    c.encoder, c.encoder_checkpoint, c.num_seeds = "sensebert", workdir, 2
    c.pools, c.skews, c.methods, c.include_digits = ("familyriver",), (10,), ("egal",), False
    c.al.rounds, c.al.batch = 2, 10
    c.min_all_labels_accuracy = 0.0  # a few steps of pre-training separate little: run the pool anyway
    tasks.run(c, str(tmp_path / "egal"))
    results = json.load(open(tmp_path / "egal" / "results.json"))
    assert results["encoder"] == name and name.startswith("sensebert encoder of ")
    r = results["pools"]["familyriver 1:10, 2 absent"]["methods"]["egal"]
    assert r["labels"] == [10, 20] and all(0.0 <= a <= 1.0 for a in r["accuracy"])
