"""WordPiece tokenization for SenseBERT, word by word (a word's supersense is predicted from its
rightmost piece), and the token -> allowed-supersense matrix M of the input embedding.

The tiny config uses the bundled 4096-piece vocabulary (data/build_wordpiece.py); any local BERT
`vocab.txt` works for real use. `whole_words` adds words to the vocabulary as single pieces (the
paper's larger vocabulary, which gives frequent words their own embedding and supersense row):
WordPiece matches the longest vocabulary entry first, so a whole word in the vocabulary is one
token.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

import numpy as np
from tokenizers import BertWordPieceTokenizer

from common.errors import UserError
from sensebert_jax.supersenses import NUM_SUPERSENSES, allowed_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_VOCAB = os.path.join(ROOT, "data", "sensebert_wordpiece", "vocab.txt")


class TokenizerError(UserError):
    """A vocabulary that cannot be used."""


class WordPieceTokenizer:
    def __init__(self, vocab_file: str = "", whole_words: Iterable[str] = (), lowercase: bool = True):
        vocab_file = vocab_file or BUNDLED_VOCAB
        if not os.path.exists(vocab_file):
            raise TokenizerError(f"{vocab_file}: no such vocabulary file")
        with open(vocab_file, encoding="utf-8") as f:
            vocab = [line.rstrip("\n") for line in f if line.strip()]
        known = set(vocab)
        vocab += [w for w in dict.fromkeys(w.lower() if lowercase else w for w in whole_words) if w not in known]
        for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
            if special not in known:
                raise TokenizerError(f"{vocab_file} lacks the special token {special}")
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
            f.write("\n".join(vocab) + "\n")
        try:
            self._tok = BertWordPieceTokenizer(f.name, lowercase=lowercase)
        finally:
            os.unlink(f.name)
        self.vocab = vocab
        ids = {t: i for i, t in enumerate(vocab)}
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            ids[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def words(self, text: str) -> list[tuple[str, list[int]]]:
        """[(word as written, its piece ids)] in order (punctuation marks are words of their own)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        out: list[tuple[str, list[int]]] = []
        spans: list[list[int]] = []
        last = None
        for tid, wid, (start, end) in zip(enc.ids, enc.word_ids, enc.offsets, strict=True):
            if wid != last or not out:
                out.append(("", []))
                spans.append([start, end])
                last = wid
            out[-1][1].append(tid)
            spans[-1][1] = end
        return [(text[s:e], ids) for (_, ids), (s, e) in zip(out, spans, strict=True)]

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))

    def token(self, i: int) -> str:
        return self.vocab[i]


def load_whole_words(path: str) -> list[str]:
    """Words, one per line, to add to the vocabulary ("" = none)."""
    if not path:
        return []
    if not os.path.exists(path):
        raise TokenizerError(f"{path}: no such whole-words file")
    with open(path, encoding="utf-8") as f:
        return [w.strip() for w in f if w.strip()]


def token_supersense_matrix(vocab: list[str]) -> np.ndarray:
    """M [vocab, 45] float32: M[w, s] = 1/|A(w)| for s in A(w) of the token's string (empty for
    pieces "##...", special tokens, short and stop words)."""
    m = np.zeros((len(vocab), NUM_SUPERSENSES), np.float32)
    for i, tok in enumerate(vocab):
        a = () if tok.startswith("[") and tok.endswith("]") else allowed_ids(tok)
        if a:
            m[i, list(a)] = 1.0 / len(a)
    return m


def pieces_with_target(tok: WordPieceTokenizer, text: str, start: int, end: int) -> tuple[list[int], int]:
    """(piece ids of the sentence, index among them of the rightmost piece of the word text[start:end])."""
    before = [i for _, p in tok.words(text[:start]) for i in p]
    target = [i for _, p in tok.words(text[start:end]) for i in p]
    after = [i for _, p in tok.words(text[end:]) for i in p]
    return before + target + after, len(before) + len(target) - 1
