"""SenseBERT pre-training examples: WordPiece by word, the paper's masking, and targets (the
pipeline that batches them is the `sensebert_pretrain` task's).

Masking (section 3.3 / appendix): a budget of 15% of a sentence's words; words with a single
supersense are chosen first, up to 40% of the budget, the rest uniformly among the other words;
a chosen word has all its pieces masked, except 1 in 10 chosen words, shown as themselves (no
random replacement). Targets: every piece of a chosen word for the masked LM; the word's
rightmost piece, when A(word) is non-empty, for the supersense losses.
"""

from __future__ import annotations

import numpy as np

from sensebert_jax.supersenses import NUM_SUPERSENSES, allowed_ids
from sensebert_jax.tokenizer import WordPieceTokenizer

MASK_BUDGET = 0.15
SINGLE_SENSE_SHARE = 0.4
KEEP_PROB = 0.1


def sentence_words(tok: WordPieceTokenizer, text: str, max_pieces: int) -> list[tuple[str, list[int]]]:
    """The sentence's words, cut at a word boundary so that their pieces fit max_pieces."""
    words, n = [], 0
    for word, ids in tok.words(text):
        if n + len(ids) > max_pieces:
            break
        words.append((word, ids))
        n += len(ids)
    return words


def choose_masked(allowed: list[tuple[int, ...]], rng: np.random.Generator) -> np.ndarray:
    """Indices of the words to mask: 15% of them (at least one), single-supersense words first up
    to 40% of that budget."""
    n = len(allowed)
    if n == 0:
        return np.zeros((0,), np.int64)
    budget = max(1, int(round(MASK_BUDGET * n)))
    single = np.asarray([i for i, a in enumerate(allowed) if len(a) == 1], np.int64)
    n_single = min(len(single), int(SINGLE_SENSE_SHARE * budget))
    chosen = rng.choice(single, n_single, replace=False) if n_single else np.zeros((0,), np.int64)
    rest = np.setdiff1d(np.arange(n), chosen)
    chosen = np.concatenate([chosen, rng.choice(rest, budget - n_single, replace=False)])
    return np.sort(chosen)


def pretraining_example(tok: WordPieceTokenizer, text: str, seq_len: int, rng: np.random.Generator) -> dict:
    words = sentence_words(tok, text, seq_len - 2)
    allowed = [allowed_ids(w.lower()) for w, _ in words]
    masked = set(choose_masked(allowed, rng).tolist())
    ids = np.full((seq_len,), tok.pad_id, np.int32)
    out = {"input_ids": ids, "attention_mask": np.zeros((seq_len,), np.int32),
           "mlm_targets": np.zeros((seq_len,), np.int32), "mlm_weights": np.zeros((seq_len,), np.float32),
           "ss_allowed": np.zeros((seq_len, NUM_SUPERSENSES), bool), "ss_weights": np.zeros((seq_len,), np.float32)}
    ids[0] = tok.cls_id
    pos = 1
    for i, (_, pieces) in enumerate(words):
        span = slice(pos, pos + len(pieces))
        ids[span] = pieces
        if i in masked:
            out["mlm_targets"][span], out["mlm_weights"][span] = pieces, 1.0
            if rng.random() >= KEEP_PROB:
                ids[span] = tok.mask_id
            if allowed[i]:
                last = pos + len(pieces) - 1
                out["ss_allowed"][last, list(allowed[i])] = True
                out["ss_weights"][last] = 1.0
        pos += len(pieces)
    ids[pos] = tok.sep_id
    out["attention_mask"][:pos + 1] = 1
    return out
