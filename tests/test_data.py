"""The text pipeline: sources, packing with segment ids, determinism and resumable iterators."""

import gzip
import json

import numpy as np
import pytest
from ml_collections import ConfigDict

from common.tokenizers import TokenizerError, load_tokenizer
from training.data import DataError, lm_dataset, make_iterator, text_source


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None, 2048)


def data_cfg(**kw):
    c = ConfigDict(dict(source="bundled", train_files="", validation_files="", text_field="text"))
    c.update(kw)
    return c


def test_gzip_files_are_byte_reproducible(tmp_path):
    """Rebuilding bundled data writes the same bytes: no timestamp or file name in the gzip header."""
    import time

    from common.files import write_gzip_text

    a, b = tmp_path / "a.txt.gz", tmp_path / "b.txt.gz"
    write_gzip_text(str(a), "one\ntwo\n")
    time.sleep(1.1)  # a header timestamp would differ
    write_gzip_text(str(b), "one\ntwo\n")
    assert a.read_bytes() == b.read_bytes() and a.read_bytes()[4:8] == b"\0\0\0\0"  # MTIME = 0
    assert gzip.decompress(a.read_bytes()) == b"one\ntwo\n"


def test_bundled_corpus_has_both_splits():
    train, val = text_source(data_cfg(), "train"), text_source(data_cfg(), "validation")
    assert len(train) > 100_000 and len(val) > 2_000
    assert not set(val[:200]) & set(train)  # disjoint splits


def test_rows_are_packed_documents_with_segment_ids(tokenizer):
    docs = ["alpha beta gamma", "delta", "epsilon zeta eta theta iota", "kappa lambda"]
    ds = lm_dataset(docs, tokenizer, batch_size=1, seq_len=64, seed=0, train=False)
    batch = next(iter(ds))
    ids, seg = batch["inputs"][0], batch["segment_ids"][0]
    assert ids.shape == seg.shape == (64,)
    pieces = [ids[seg == s] for s in range(1, seg.max() + 1)]
    assert [tokenizer.decode(p) for p in pieces] == docs  # one segment per document, in order
    assert (seg[len(np.concatenate(pieces)):] == 0).all()  # padding after the last document
    assert all(p[0] == tokenizer.bos_id and p[-1] == tokenizer.eos_id for p in pieces)


def test_iterator_state_resumes_exactly(tokenizer):
    docs = text_source(data_cfg(), "validation")
    ds = lm_dataset(docs, tokenizer, batch_size=4, seq_len=32, seed=3, train=True)
    it = make_iterator(ds)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = [next(it) for _ in range(3)]
    again = make_iterator(ds, state)
    for want in expected:
        got = next(again)
        np.testing.assert_array_equal(got["inputs"], want["inputs"])
        np.testing.assert_array_equal(got["segment_ids"], want["segment_ids"])


def test_text_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "third doc"}) + "\n" + json.dumps({"text": "fourth"}) + "\n")
    assert text_source(data_cfg(source="text", train_files=str(tmp_path / "*.txt")), "train") == [
        "first doc", "second doc"]
    assert text_source(data_cfg(source="jsonl", validation_files=str(tmp_path / "b.jsonl.gz")), "validation") == [
        "third doc", "fourth"]
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: not a JSON object with a 'text' field"):
        text_source(data_cfg(source="jsonl", train_files=str(tmp_path / "bad.jsonl")), "train")


def test_invalid_utf8_is_named_or_replaced(tmp_path):
    bad = tmp_path / "bad.txt.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"first document\nsecond \xc3\x28 document\n")
    with pytest.raises(DataError, match=r"bad.txt.gz:2: invalid UTF-8 at byte 7"):
        text_source(data_cfg(source="text", train_files=str(bad)), "train")
    docs = text_source(data_cfg(source="text", train_files=str(bad), encoding_errors="replace"), "train")
    assert docs == ["first document", "second \ufffd( document"]
    with pytest.raises(DataError, match="encoding_errors='ignore'"):
        text_source(data_cfg(source="text", train_files=str(bad), encoding_errors="ignore"), "train")


def test_tfds_source_reads_a_prepared_array_record_dataset(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")  # only *writing* a TFDS dataset needs TensorFlow; reading does not
    docs = [f"document number {i}" for i in range(10)]
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_text", version="1.0.0", features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        split_datasets={"train": [{"text": d} for d in docs]}, config=None, data_dir=str(tmp_path),
        file_format="array_record")
    del builder
    src = text_source(data_cfg(source="tfds", tfds_name="tiny_text", tfds_data_dir=str(tmp_path),
                               train_split="train", validation_split="train"), "train")
    assert sorted(src[i] for i in range(len(src))) == sorted(docs)
    with pytest.raises(DataError, match="not readable"):
        text_source(data_cfg(source="tfds", tfds_name="no_such_set", tfds_data_dir=str(tmp_path),
                             train_split="train", validation_split="train"), "train")


def test_missing_tfds_dataset_is_named(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError, match="TFDS dataset 'no_such_set' split 'train' is not readable"):
        text_source(data_cfg(source="tfds", tfds_name="no_such_set", tfds_data_dir=str(tmp_path),
                             train_split="train", validation_split="train"), "train")


def test_unknown_source_is_named():
    with pytest.raises(DataError, match="source='hdfs'"):
        text_source(data_cfg(source="hdfs"), "train")


def test_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(text_source(data_cfg(), "validation")[:500]))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                   bos_id=1, eos_id=2, pad_id=0, unk_id=3)
    tok = load_tokenizer(str(tmp_path / "sp.model"), 512)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (300, 0, 1, 2)
    assert tok.decode(tok.encode("a small dog")) == "a small dog"
    with pytest.raises(TokenizerError, match="300 tokens but the vocabulary of the model has 200"):
        load_tokenizer(str(tmp_path / "sp.model"), 200)
