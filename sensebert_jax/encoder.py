"""Word-in-context features from a pre-trained SenseBERT: the encoder's output at a target word's last
piece (what exemplar-guided active learning embeds examples with, `tasks/egal_wsd.py`)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from sensebert_jax.checkpoint import load_pretrained
from sensebert_jax.model import SenseBertEncoder
from sensebert_jax.tokenizer import pieces_with_target


def sensebert_encoder(workdir: str):
    """(embed, description): embed(texts, spans [(start, end)], batch=64) -> [n, hidden] float32, a
    sensebert_pretrain run's encoder output at the last piece of each text[start:end]."""
    setup, params, _ = load_pretrained(workdir)
    tok, cfg, m = setup.tokenizer, setup.cfg, setup.supersense_matrix
    encoder = SenseBertEncoder(cfg)

    @jax.jit
    def hidden(ids, mask):
        return encoder.apply({"params": params["encoder"]}, ids, mask, jnp.zeros_like(ids), m)[0]

    def embed(texts, spans, batch=64):
        rows, where = [], []
        for text, (start, end) in zip(texts, spans, strict=True):
            pieces, t = pieces_with_target(tok, text, start, end)
            row = ([tok.cls_id] + pieces + [tok.sep_id])[:cfg.max_position_embeddings]
            rows.append(row)
            where.append(min(t + 1, len(row) - 1))
        width = max(len(r) for r in rows)
        out = []
        for i in range(0, len(rows), batch):
            ids = np.zeros((len(rows[i:i + batch]), width), np.int32)
            mask = np.zeros_like(ids)
            for r, row in enumerate(rows[i:i + batch]):
                ids[r, :len(row)], mask[r, :len(row)] = row, 1
            h = np.asarray(hidden(jnp.asarray(ids), jnp.asarray(mask)), np.float32)
            out.append(h[np.arange(len(ids)), where[i:i + batch]])
        return np.concatenate(out)

    return embed, f"sensebert encoder of {os.path.abspath(workdir)}"
