"""Word-in-context features from a causal Jamba: a layer's output at a target word (what exemplar-guided
active learning embeds examples with, `tasks/egal_wsd.py`)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from common.errors import UserError
from common.tokenizers import load_tokenizer
from jamba_jax.checkpoint import load_checkpoint
from jamba_jax.layout import layer_output
from jamba_jax.model import JambaForCausalLM


class EncoderLayerError(UserError):
    """A layer the model does not have."""


def _rows(tok, texts, spans):
    """Token rows (<bos> text) and, per row, the index of the last token overlapping text[start:end]."""
    rows, where = [], []
    for text, (start, end) in zip(texts, spans, strict=True):
        ids, offsets = tok.encode_with_offsets(text)
        rows.append(([tok.bos_id] if tok.bos_id is not None else []) + ids)
        where.append(len(rows[-1]) - len(ids) + max(i for i, (a, b) in enumerate(offsets) if a < end and b > start))
    return rows, where


def jamba_encoder(checkpoint: str, layer: int, tokenizer: str = ""):
    """(embed, description): embed(texts, spans [(start, end)], batch=64) -> [n, 2 x hidden] float32, a Jamba
    checkpoint's layer output (-1: the last layer's) at the last token of each text[start:end], beside its
    output at the sentence's last token: a causal LM's state at the word sees only what precedes it, the
    end of the sentence sees the rest too."""
    cfg, params = load_checkpoint(checkpoint)
    if not -1 <= layer < cfg.num_hidden_layers:
        raise EncoderLayerError(f"encoder layer {layer}: the Jamba at {checkpoint} has {cfg.num_hidden_layers} "
                                "layers")
    tok = load_tokenizer(tokenizer, cfg.vocab_size)
    model = JambaForCausalLM(cfg)

    @jax.jit
    def hidden(ids, mask, target):
        _, state = model.apply({"params": params}, ids, attention_mask=mask, mutable=["hidden_states"])
        h = layer_output(cfg, state["hidden_states"], layer if layer >= 0 else cfg.num_hidden_layers - 1)
        return jnp.concatenate([jnp.take_along_axis(h, target[:, None, None], axis=1)[:, 0], h[:, -1]], axis=-1)

    def embed(texts, spans, batch=64):
        rows, where = _rows(tok, texts, spans)
        width = max(len(r) for r in rows)
        out = []
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            ids = np.zeros((len(chunk), width), np.int32)
            mask = np.zeros_like(ids)
            target = np.zeros((len(chunk),), np.int32)
            for r, row in enumerate(chunk):  # left-padded: the sentence ends at the last position
                ids[r, width - len(row):], mask[r, width - len(row):] = row, 1
                target[r] = width - len(row) + where[i + r]
            out.append(np.asarray(hidden(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(target)), np.float32))
        return np.concatenate(out)

    return embed, f"jamba layer {layer} of {os.path.abspath(checkpoint)}"
