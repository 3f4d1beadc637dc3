"""Instruction data for fine-tuning (`config.data.format`): each record becomes token ids and a per-token
loss weight, and records are packed whole into rows of `seq_len` (first fit, never split across rows), the
weights packed beside the ids so that they stay aligned with the segments.

  chat               JSONL, one conversation per line: {"messages": [{"role", "content"}, ...], "tools": [...]}
                     (OpenAI's and Hugging Face's format; roles system, user, assistant, tool), rendered with the
                     tokenizer's chat template (`common.chat_template`, as transformers renders it)
  prompt_completion  JSONL, {"prompt": ..., "completion": ...}: strings (<bos> prompt completion <eos>) or lists
                     of messages (rendered as one conversation)

`config.data.train_on`: "assistant" (the loss on what the assistant says: the template's generation blocks,
or the completion) or "all". A record longer than seq_len is cut to it (`config.data.overlong="truncate"`)
or left out ("drop"); how many of each is printed once per split.
"""

from __future__ import annotations

import grain
import numpy as np
from grain import experimental as grain_experimental

from common.chat_template import ROLES
from training.data import DataError, document_stream, json_records, process_rows

FORMATS = ("text", "chat", "prompt_completion")
TRAIN_ON = ("assistant", "all")
OVERLONG = ("truncate", "drop")


def _check_messages(messages, where: str, key: str = "messages") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {key!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise DataError(f"{where}: message {i} of {key!r} is not an object with a 'role'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}; the roles are {', '.join(ROLES)}")
    return messages


def encode_record(tok, record: dict, where: str, fmt: str, train_on: str) -> tuple[list[int], list[float]]:
    """(token ids, loss weight per token) of one record (module docstring)."""
    if fmt == "chat" or (fmt == "prompt_completion" and isinstance(record.get("prompt"), list)):
        if fmt == "chat":
            messages = _check_messages(record.get("messages"), where)
        else:
            messages = _check_messages(record["prompt"], where, "prompt") + _check_messages(
                record.get("completion"), where, "completion")
        if train_on == "assistant" and not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the conversation has no assistant message: nothing to train on "
                            "(config.data.train_on='assistant')")
        ids, mask = tok.encode_chat(messages, record.get("tools"))
        return ids, [float(m) for m in mask] if train_on == "assistant" else [1.0] * len(ids)
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DataError(f"{where}: a prompt_completion record needs 'prompt' and 'completion' strings (or message "
                        "lists)")
    head = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
    tail = tok.encode(completion) + ([tok.eos_id] if tok.eos_id is not None else [])
    return head + tail, [0.0 if train_on == "assistant" else 1.0] * len(head) + [1.0] * len(tail)


def sft_examples(data_cfg, tok, split: str, seq_len: int) -> list[dict[str, np.ndarray]]:
    """Every record of the split as {"inputs": ids, "weights": loss weights}, cut to or leaving out those
    longer than seq_len as config.data.overlong says (printing the count once)."""
    fmt, train_on = data_cfg.get("format", "text"), data_cfg.get("train_on", "assistant")
    overlong = data_cfg.get("overlong", "truncate")
    for name, value, allowed in (("format", fmt, FORMATS), ("train_on", train_on, TRAIN_ON),
                                 ("overlong", overlong, OVERLONG)):
        if value not in allowed:
            raise DataError(f"config.data.{name}={value!r}; expected one of {allowed}")
    out, long = [], 0
    records = json_records(data_cfg, split)
    for where, record in records:
        ids, weights = encode_record(tok, record, where, fmt, train_on)
        if len(ids) > seq_len:
            long += 1
            if overlong == "drop":
                continue
            ids, weights = ids[:seq_len], weights[:seq_len]
        out.append({"inputs": np.asarray(ids, np.int32), "weights": np.asarray(weights, np.float32)})
    if long:
        print(f"data: {long} of {len(records)} {split} records are longer than seq_len={seq_len}: "
              f"{'cut to it' if overlong == 'truncate' else 'left out'} (config.data.overlong)", flush=True)
    if not out:
        raise DataError(f"no {split} record fits seq_len={seq_len} (config.data.overlong='drop')")
    return out


def sft_dataset(examples, *, batch_size: int, seq_len: int, seed: int, train: bool, process_index: int = 0,
                process_count: int = 1) -> grain.IterDataset:
    """Batches {"inputs", "segment_ids", "weights"} [rows, seq_len] of examples packed whole into rows (first
    fit over `batch_size` bins), shuffled per epoch when training; process p gets its rows of each batch."""
    ds = document_stream(examples, batch_size, seed, train, process_count).to_iter_dataset()
    ds = grain_experimental.FirstFitPackIterDataset(ds, length_struct={"inputs": seq_len, "weights": seq_len},
                                                   num_packing_bins=batch_size, shuffle_bins=False)

    def finish(b):
        out = {"inputs": b["inputs"], "segment_ids": b["inputs_segment_ids"], "weights": b["weights"]}
        return process_rows(out, batch_size, process_index, process_count)

    return ds.batch(batch_size, drop_remainder=train).map(finish)
