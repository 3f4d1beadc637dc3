"""Training data: text sources, and the grain pipelines every task builds its batches with (packed LM
rows with segment ids; one example per document; one encoded row per record). Tokenizers are
`common.tokenizers`'.

Sources (`config.data.source`):
  bundled  the WordNet-derived English corpus shipped in data/wordnet_corpus (train / validation)
  text     local .txt files (optionally .gz), one document per line
  jsonl    local .jsonl files (optionally .gz), one JSON object per line, text under `text_field`
  tfds     any TFDS dataset prepared under `tfds_data_dir`, read with `tfds.data_source`
           (array_record: random access, no TensorFlow needed), text under `text_field`

The pipelines are deterministic: shuffle with the seed (a fresh order each epoch), make examples
(`lm_dataset`: tokenize <bos> doc <eos>, concatenate and split into rows of `seq_len` with segment
ids, 1, 2, ... per document piece, 0 for padding), batch, and keep this JAX process's rows. Their
iterator state is a small JSON dict saved with every checkpoint, so a resumed run sees exactly the
batches the uninterrupted run would.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from typing import Any

import grain
import numpy as np
from grain import experimental as grain_experimental

from common.errors import UserError
from common.tokenizers import TextTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_CORPUS = os.path.join(ROOT, "data", "wordnet_corpus")


class DataError(UserError):
    """A data source that cannot be used as configured."""


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------
ENCODING_ERRORS = ("strict", "replace")


def _open_text(path: str, errors: str = "strict"):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors=errors)
    return open(path, encoding="utf-8", errors=errors)


def _first_bad_utf8(path: str) -> tuple[int, int]:
    """(line number, byte within the line) of the first invalid UTF-8 in a text file."""
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return n, e.start
    return 0, 0


def expand_files(patterns, field: str) -> list[str]:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
    patterns = [p for p in patterns if p]
    if not patterns:
        raise DataError(f"config.{field} is empty: this data source needs files (a path or glob, or a list of them)")
    files = []
    for p in patterns:
        matches = sorted(glob.glob(p))
        if not matches:
            raise DataError(f"data file {p} does not exist (config.{field})")
        files += matches
    return files


def read_lines(files: list[str], jsonl_field: str | None, errors: str = "strict") -> list:
    """The documents of text files (a line each), or of JSONL files: each line's `jsonl_field`, or with
    jsonl_field "*" ("path:line", the whole JSON object) pairs. Names the file and line of bad UTF-8 or JSON."""
    if errors not in ENCODING_ERRORS:
        raise DataError(f"config.data.encoding_errors={errors!r}; expected one of {ENCODING_ERRORS}")
    docs = []
    for path in files:
        try:
            docs += read_file(path, jsonl_field, errors)
        except UnicodeDecodeError as e:
            line, byte = _first_bad_utf8(path)
            raise DataError(f"{path}:{line}: invalid UTF-8 at byte {byte} of the line ({e.reason}); fix the file or "
                            "set config.data.encoding_errors='replace'") from e
    return docs


def read_file(path: str, jsonl_field: str | None, errors: str) -> list:
    docs = []
    with _open_text(path, errors) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            if jsonl_field is None:
                docs.append(line.rstrip("\n"))
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise TypeError(f"a JSON {type(record).__name__}")
                docs.append((f"{path}:{i + 1}", record) if jsonl_field == "*" else record[jsonl_field])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                what = "a JSON object" if jsonl_field == "*" else f"a JSON object with a {jsonl_field!r} field"
                raise DataError(f"{path}:{i + 1}: not {what} ({e})") from e
    if not docs:
        raise DataError(f"data file {path} holds no documents (it is empty)")
    return docs


class _TfdsText:
    """Random access to the text field of a TFDS array_record data source."""

    def __init__(self, source, field: str):
        self._source, self._field = source, field

    def __len__(self):
        return len(self._source)

    def __getitem__(self, i):
        value = self._source[i][self._field]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def json_records(data_cfg, split: str) -> list[tuple[str, dict]]:
    """("path:line", JSON object) of every line of the split's JSONL files (config.data.source = "jsonl")."""
    if data_cfg.source != "jsonl":
        raise DataError(f"config.data.format={data_cfg.get('format', 'text')!r} reads JSONL files: set "
                        f"config.data.source='jsonl' (it is {data_cfg.source!r})")
    field = "data.train_files" if split == "train" else "data.validation_files"
    files = expand_files(data_cfg.train_files if split == "train" else data_cfg.validation_files, field)
    return read_lines(files, "*", data_cfg.get("encoding_errors", "strict"))


def text_source(data_cfg, split: str):
    """A random-access sequence of document strings for `split` ('train' or 'validation')."""
    kind = data_cfg.source
    if kind == "bundled":
        return read_lines([os.path.join(BUNDLED_CORPUS, f"{split}.txt.gz")], None)
    if kind in ("text", "jsonl"):
        field = "data.train_files" if split == "train" else "data.validation_files"
        files = expand_files(data_cfg.train_files if split == "train" else data_cfg.validation_files, field)
        return read_lines(files, data_cfg.text_field if kind == "jsonl" else None,
                           data_cfg.get("encoding_errors", "strict"))
    if kind == "tfds":
        import tensorflow_datasets as tfds

        tfds_split = data_cfg.train_split if split == "train" else data_cfg.validation_split
        try:
            source = tfds.data_source(data_cfg.tfds_name, split=tfds_split, data_dir=data_cfg.tfds_data_dir or None,
                                      download=False)
        except Exception as e:  # tfds raises several unrelated types for a missing dataset
            raise DataError(f"TFDS dataset {data_cfg.tfds_name!r} split {tfds_split!r} is not readable from "
                            f"{data_cfg.tfds_data_dir!r}: {e}") from e
        if len(source) == 0:
            raise DataError(f"TFDS dataset {data_cfg.tfds_name!r} split {tfds_split!r} is empty")
        return _TfdsText(source, data_cfg.text_field)
    raise DataError(f"config.data.source={kind!r}; expected one of 'bundled', 'text', 'jsonl', 'tfds'")


# ------------------------------------------------------------------------------------------------
# Pipeline
# ------------------------------------------------------------------------------------------------
def lm_dataset(docs, tokenizer: TextTokenizer, *, batch_size: int, seq_len: int, seed: int, train: bool,
               process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Batches {"inputs": int32 [rows, seq_len], "segment_ids": int32 [rows, seq_len]}.

    batch_size is the global batch; process p of process_count gets rows [p * n, (p + 1) * n),
    n = batch_size / process_count, of every global batch. Every process reads the same stream,
    so the global batches (and the iterator state) do not depend on the number of processes.
    Eval batches (train=False) keep the last partial batch, padded with all-zero rows (segment 0:
    no targets) to the full batch size.
    """
    ds = document_stream(docs, batch_size, seed, train, process_count)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id

    def tokenize(text: str) -> dict[str, np.ndarray]:
        ids = ([bos] if bos is not None else []) + tokenizer.encode(text) + ([eos] if eos is not None else [])
        return {"inputs": np.asarray(ids, np.int32)}

    def finish(b):
        out = {"inputs": b["inputs"], "segment_ids": b["inputs_segment_ids"]}
        return process_rows(out, batch_size, process_index, process_count)

    it = ds.map(tokenize).to_iter_dataset()
    it = grain_experimental.ConcatThenSplitIterDataset(it, length_struct={"inputs": seq_len})
    return it.batch(batch_size, drop_remainder=train).map(finish)


def document_stream(docs, batch_size: int, seed: int, train: bool, process_count: int) -> grain.MapDataset:
    """The documents every process reads: shuffled with a fresh permutation each epoch, endlessly,
    when training; once, in order, for eval. Names an empty source or an unsplittable batch."""
    if batch_size % process_count:
        raise DataError(f"batch_size={batch_size} is not divisible by the {process_count} processes")
    ds = grain.MapDataset.source(docs)
    if len(ds) == 0:
        raise DataError("the data source holds no documents")
    return ds.shuffle(seed=seed).repeat(None) if train else ds


def process_rows(batch: dict[str, np.ndarray], batch_size: int, process_index: int, process_count: int) -> dict:
    """This process's rows [p * n, (p + 1) * n) of a global batch, after padding a short (last eval)
    batch with all-zero rows to batch_size."""
    short = batch_size - next(iter(batch.values())).shape[0]
    if short:
        batch = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    rows = batch_size // process_count
    return {k: v[process_index * rows:(process_index + 1) * rows] for k, v in batch.items()}


def make_iterator(ds: grain.IterDataset, state: dict[str, Any] | None = None):
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    return it


def example_batches(docs, example, *, batch_size: int, seed: int, train: bool, process_index: int = 0,
                    process_count: int = 1) -> grain.IterDataset:
    """This process's batches of `example(document, rng)` dicts of numpy arrays, the documents shuffled per
    epoch when training. `rng` is a numpy Generator drawn per (document, epoch) from the seed, so a resumed
    run sees the same examples."""
    ds = document_stream(docs, batch_size, seed, train, process_count).random_map(example, seed=seed)
    ds = ds.batch(batch_size, drop_remainder=train)
    return ds.map(lambda b: process_rows(b, batch_size, process_index, process_count)).to_iter_dataset()


def record_batches(records, encode, *, batch_size: int, seed: int, train: bool, process_index: int = 0,
                   process_count: int = 1) -> grain.IterDataset:
    """This process's batches of `encode(record)` dicts, the records shuffled per epoch when training
    (labelled rows of a fine-tuning set)."""
    ds = grain.MapDataset.source(records)
    if train:
        ds = ds.shuffle(seed=seed).repeat(None)
    ds = ds.map(encode).batch(batch_size, drop_remainder=train)
    return ds.map(lambda b: process_rows(b, batch_size, process_index, process_count)).to_iter_dataset()
