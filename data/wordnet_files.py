"""Reading WordNet 3.0 database files (the `data.*` files of Debian's `wordnet-base`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

WORDNET_DIR = os.environ.get("WORDNET_DIR", "/usr/share/wordnet")
POS_FILES = ("noun", "verb", "adj", "adv")


def require_wordnet(wordnet_dir: str = WORDNET_DIR) -> str:
    missing = [p for p in POS_FILES if not os.path.exists(os.path.join(wordnet_dir, f"data.{p}"))]
    if missing:
        raise FileNotFoundError(f"{wordnet_dir}: no WordNet 3.0 data.{missing[0]}; install Debian's wordnet-base "
                                "(apt-get install wordnet-base) or set WORDNET_DIR")
    return wordnet_dir


def synsets(pos: str, wordnet_dir: str = WORDNET_DIR) -> Iterator[dict]:
    """Yields {offset, lexfile (int), pos, words [str], gloss} for each synset of a data.<pos> file."""
    with open(os.path.join(wordnet_dir, f"data.{pos}"), encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # license header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            n_words = int(fields[3], 16)
            words = [fields[4 + 2 * i] for i in range(n_words)]
            yield {"offset": fields[0], "lexfile": int(fields[1]), "pos": fields[2], "words": words,
                   "gloss": gloss.strip()}
