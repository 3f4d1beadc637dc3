"""Word-in-context features without a neural encoder: Schütze's context vectors ("Automatic word sense
discrimination", Computational Linguistics 1998), the classical features of pseudo-word disambiguation.

  word vectors   the positive PMI matrix of word co-occurrences within +-`window` words over a corpus
                 (context counts smoothed to the power 0.75, Levy & Goldberg 2014), reduced to `dim`
                 dimensions by a truncated SVD (U sqrt(S)), each row scaled to unit length
  a context      the idf-weighted mean of the vectors of the words around the target, the target span
                 itself left out, scaled to unit length (zeros when no word is in the vocabulary)

A sentence's words say which sense its target word has (a "river" sentence speaks of water and banks,
a "family" sentence of kin), and the corpus-wide vectors let two sentences that share no word still lie
close. Deterministic for a given corpus (the SVD's random start is seeded).
"""

from __future__ import annotations

import collections
import re

import numpy as np

from active_learning.proposal import PoolError

WORD = re.compile(r"[a-z]+")


def _cooccurrence(tokens: list[list[int]], vocab: int, window: int):
    from scipy import sparse

    rows, cols = [], []
    for ids in tokens:
        ids = np.asarray(ids, np.int64)
        for shift in range(1, window + 1):  # each pair (i, i + shift) counted both ways
            a, b = ids[:-shift], ids[shift:]
            keep = (a >= 0) & (b >= 0)
            rows += [a[keep], b[keep]]
            cols += [b[keep], a[keep]]
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    return sparse.coo_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(vocab, vocab)).tocsr()


def word_vectors(docs, dim: int = 64, window: int = 5, min_count: int = 5, seed: int = 0):
    """(index {word: row}, vectors [V, dim] float32 unit rows, idf [V]) from an iterable of documents."""
    from scipy import sparse
    from sklearn.utils.extmath import randomized_svd

    words = [WORD.findall(d.lower()) for d in docs]
    counts = collections.Counter(w for ws in words for w in ws)
    vocab = sorted(w for w, c in counts.items() if c >= min_count)
    if len(vocab) <= dim:
        raise PoolError(f"the corpus has {len(vocab)} words seen {min_count}+ times; context vectors of {dim} "
                        "dimensions need more")
    index = {w: i for i, w in enumerate(vocab)}
    tokens = [[index.get(w, -1) for w in ws] for ws in words]
    m = _cooccurrence(tokens, len(vocab), window).tocoo()
    total = float(m.data.sum())
    row = np.asarray(m.sum(axis=1)).ravel()
    col = np.asarray(m.sum(axis=0)).ravel() ** 0.75
    col = col / col.sum() * total
    pmi = np.log(m.data * total / (row[m.row] * col[m.col]))
    keep = pmi > 0
    ppmi = sparse.csr_matrix((pmi[keep], (m.row[keep], m.col[keep])), shape=m.shape)
    u, s, _ = randomized_svd(ppmi, dim, random_state=seed)
    vectors = u * np.sqrt(s)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12
    df = collections.Counter(w for ws in words for w in set(ws))
    idf = np.log(len(words) / np.asarray([df[w] for w in vocab], np.float64))
    return index, vectors.astype(np.float32), idf.astype(np.float32)


def context_encoder(docs, dim: int = 64, window: int = 5, min_count: int = 5):
    """(embed, description): embed(texts, spans [(start, end)]) -> [n, dim] float32 context vectors of the
    words of each text outside text[start:end] (module docstring)."""
    index, vectors, idf = word_vectors(docs, dim, window, min_count)

    def embed(texts, spans, batch=None):
        out = np.zeros((len(texts), dim), np.float32)
        for r, (text, (start, end)) in enumerate(zip(texts, spans, strict=True)):
            ids = [index[w] for w in WORD.findall((text[:start] + " " + text[end:]).lower()) if w in index]
            if ids:
                v = (vectors[ids] * idf[ids, None]).sum(0)
                out[r] = v / (np.linalg.norm(v) + 1e-12)
        return out

    return embed, (f"context vectors (Schütze 1998): PPMI of +-{window}-word co-occurrences over the bundled corpus, "
                   f"SVD to {dim} dimensions, idf-weighted mean over each sentence's other words")
