"""Builds common/wordnet_lexicon.json.gz from WordNet 3.0 database files (Debian `wordnet-base`):
for each part of speech, lemma -> the supersenses (lexicographer-file ids) of its synsets, plus
what WordNet's morphy lemmatiser needs: the exception lists (*.exc) and the detachment rules
(as in WordNet's morph.c). With it, `sensebert_jax.allowed_supersenses` needs no WordNet install.

  python -m data.build_supersense_lexicon [--wordnet_dir /usr/share/wordnet]

WordNet 3.0 license: data/wordnet_corpus/LICENSE (Princeton University, free to use with notice).
"""

from __future__ import annotations

import argparse
import json
import os

from common.files import write_gzip_text
from data.wordnet_files import POS_FILES, WORDNET_DIR, require_wordnet, synsets

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "common", "wordnet_lexicon.json.gz")

# morph.c's detachment rules: (suffix, replacement) tried in order for each part of speech
DETACHMENT_RULES = {
    "noun": [["s", ""], ["ses", "s"], ["xes", "x"], ["zes", "z"], ["ches", "ch"], ["shes", "sh"], ["men", "man"],
             ["ies", "y"]],
    "verb": [["s", ""], ["ies", "y"], ["es", "e"], ["es", ""], ["ed", "e"], ["ed", ""], ["ing", "e"], ["ing", ""]],
    "adj": [["er", ""], ["est", ""], ["er", "e"], ["est", "e"]],
    "adv": [],
}


def clean_lemma(word: str) -> str:
    """data.* spells multiword lemmas with '_' and marks some adjectives '(a)', '(p)', '(ip)'."""
    if word.endswith(")") and "(" in word:
        word = word[:word.index("(")]
    return word.lower().replace("_", " ")


def build(wordnet_dir: str) -> dict:
    require_wordnet(wordnet_dir)
    lemmas: dict[str, dict[str, list[int]]] = {}
    for pos in POS_FILES:
        table: dict[str, set[int]] = {}
        for syn in synsets(pos, wordnet_dir):
            for w in syn["words"]:
                table.setdefault(clean_lemma(w), set()).add(syn["lexfile"])
        lemmas[pos] = {w: sorted(s) for w, s in sorted(table.items())}
    exceptions: dict[str, dict[str, list[str]]] = {}
    for pos in POS_FILES:
        table = {}
        with open(os.path.join(wordnet_dir, f"{pos}.exc"), encoding="latin-1") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2:
                    table.setdefault(parts[0].replace("_", " "), []).extend(p.replace("_", " ") for p in parts[1:])
        exceptions[pos] = dict(sorted(table.items()))
    return {"source": "WordNet 3.0 (Princeton University), built by data/build_supersense_lexicon.py",
            "lemmas": lemmas, "exceptions": exceptions, "detachment_rules": DETACHMENT_RULES}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--wordnet_dir", default=WORDNET_DIR)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    lex = build(args.wordnet_dir)
    write_gzip_text(args.out, json.dumps(lex, separators=(",", ":"), sort_keys=True))
    n = sum(len(v) for v in lex["lemmas"].values())
    print(f"wrote {args.out}: {n} (lemma, pos) entries, {os.path.getsize(args.out) / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
