"""Trains the tiny SenseBERT's WordPiece vocabulary (lowercased, 4096 pieces, BERT's special
tokens) on the bundled corpus's training split with HF tokenizers, and writes
data/sensebert_wordpiece/vocab.txt.

  python -m data.build_wordpiece [--vocab_size 4096]
"""

from __future__ import annotations

import argparse
import gzip
import os

from tokenizers import BertWordPieceTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "sensebert_wordpiece")
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab_size", type=int, default=4096)
    args = ap.parse_args(argv)
    with gzip.open(os.path.join(HERE, "wordnet_corpus", "train.txt.gz"), "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(lines, vocab_size=args.vocab_size, special_tokens=SPECIAL, min_frequency=2)
    os.makedirs(OUT_DIR, exist_ok=True)
    tok.save_model(OUT_DIR)
    print(f"wrote {OUT_DIR}/vocab.txt ({tok.get_vocab_size()} pieces)")


if __name__ == "__main__":
    main()
