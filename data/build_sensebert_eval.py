"""Builds SenseBERT's evaluation sets from WordNet 3.0's own example sentences (no download):

  supersense tagging   each example sentence with the word of its synset it contains, labelled
                       with the synset's supersense (SemEval-SS style, one tagged word per sentence)
  word in context      pairs of example sentences of the same lemma and part of speech, labelled
                       1 when both come from the same synset, 0 otherwise (how WiC was built),
                       balanced between the labels

Rows are shuffled (seed 0). Both are split by lemma (crc32(lemma) % 5 == 0: test), so test lemmas
are never seen in training.
Writes data/sensebert_eval/{tagging,wic}.jsonl.gz.

  python -m data.build_sensebert_eval [--wordnet_dir /usr/share/wordnet]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import zlib
from collections import defaultdict

from common.files import write_gzip_text
from common.wordnet import morphy
from data.build_supersense_lexicon import clean_lemma
from data.wordnet_files import POS_FILES, WORDNET_DIR, require_wordnet, synsets

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sensebert_eval")
_POS = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
MAX_WIC_PAIRS = 8000


def split_of(lemma: str) -> str:
    return "test" if zlib.crc32(lemma.encode()) % 5 == 0 else "train"


def examples(gloss: str) -> list[str]:
    return [m.strip() for m in re.findall(r'"([^"]+)"', gloss) if len(m.split()) >= 3]


def find(text: str, lemma: str, pos: str):
    """(start, end) of the first word of text whose base form is lemma, or None."""
    for m in _WORD.finditer(text):
        w = m.group(0).lower()
        if w == lemma or lemma in morphy(w, pos):
            return m.start(), m.end()
    return None


def build(wordnet_dir: str):
    require_wordnet(wordnet_dir)
    tagging = []
    for pos_file in POS_FILES:
        for syn in synsets(pos_file, wordnet_dir):
            pos = _POS[syn["pos"]]
            lemmas = [clean_lemma(w) for w in syn["words"]]
            for text in examples(syn["gloss"]):
                for lemma in lemmas:
                    if " " in lemma or "-" in lemma:
                        continue
                    span = find(text, lemma, pos)
                    if span:
                        tagging.append({"text": text, "start": span[0], "end": span[1], "lemma": lemma, "pos": pos,
                                        "supersense": syn["lexfile"], "synset": syn["offset"] + syn["pos"],
                                        "split": split_of(lemma)})
                        break
    by_lemma = defaultdict(list)
    for i, ex in enumerate(tagging):
        by_lemma[(ex["lemma"], ex["pos"])].append(i)
    rng = random.Random(0)
    same, diff = [], []
    for key in sorted(by_lemma):
        idx = by_lemma[key]
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                ea, eb = tagging[idx[a]], tagging[idx[b]]
                (same if ea["synset"] == eb["synset"] else diff).append((idx[a], idx[b]))
    rng.shuffle(same)
    rng.shuffle(diff)
    n = min(len(same), len(diff), MAX_WIC_PAIRS // 2)
    wic = []
    for label, pairs in ((1, same[:n]), (0, diff[:n])):
        for a, b in pairs:
            ea, eb = tagging[a], tagging[b]
            wic.append({"text1": ea["text"], "start1": ea["start"], "end1": ea["end"], "text2": eb["text"],
                        "start2": eb["start"], "end2": eb["end"], "lemma": ea["lemma"], "pos": ea["pos"],
                        "label": label, "split": split_of(ea["lemma"])})
    rng.shuffle(wic)
    rng.shuffle(tagging)  # the synsets came in part-of-speech order; any prefix should be a fair sample
    return tagging, wic


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--wordnet_dir", default=WORDNET_DIR)
    args = ap.parse_args(argv)
    tagging, wic = build(args.wordnet_dir)
    os.makedirs(OUT_DIR, exist_ok=True)
    for name, rows in (("tagging", tagging), ("wic", wic)):
        path = os.path.join(OUT_DIR, f"{name}.jsonl.gz")
        write_gzip_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        n_test = sum(r["split"] == "test" for r in rows)
        print(f"wrote {path}: {len(rows)} rows ({n_test} test), {os.path.getsize(path) / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
