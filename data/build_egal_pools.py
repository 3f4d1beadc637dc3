"""Word-sense pools for exemplar-guided active learning, from the bundled WordNet corpus: pseudo-words,
the classical construction of word-sense benchmarks (Gale, Church & Yarowsky 1992; Schütze 1998).

Two unrelated words w1, w2 become one ambiguous token "w1w2"; a sentence that contained w1 or w2 (in
a document's gloss or examples, not its headword list) is an example whose label is which word was
there. Each class's exemplar is a dictionary entry: the WordNet gloss of the word (the corpus
document headed by it), with the word replaced by the pseudo-word too. Held-out examples (a disjoint
set of documents) make the balanced test sets; the runner draws pools of any skew from the rest.

Real polysemous lemmas are not used: the only sense-tagged text here is WordNet's own example sentences
(data/sensebert_eval/tagging.jsonl.gz), at most 64 for one lemma ("break", verb; its commonest
supersense 17 of them), so no lemma gives a pool of the runner's 200-label budget, let alone one
skewed 1:10 or 1:100 with a test set beside it.

  python -m data.build_egal_pools       (a few seconds; writes data/egal_pools/pseudowords.jsonl.gz)

Output, one JSON object per pseudo-word: {"name", "words": [w1, w2], "exemplars": [text, text],
"examples": [{"text", "start", "end", "label", "split"}]} where text[start:end] is the pseudo-word.
"""

from __future__ import annotations

import gzip
import json
import os
import re

import numpy as np

from common.files import write_gzip_text

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "egal_pools", "pseudowords.jsonl.gz")
# (frequent word, its partner): unrelated nouns with hundreds to thousands of corpus documents each
PAIRS = [("person", "music"), ("family", "river"), ("city", "disease"), ("language", "food")]
MAX_PER_WORD = 1200  # examples kept per word (pools are drawn from these)
TEST_PER_WORD = 100  # held-out examples per word (the balanced test set)


def corpus_documents() -> list[str]:
    with gzip.open(os.path.join(HERE, "wordnet_corpus", "train.txt.gz"), "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def headword_gloss(docs: list[str], word: str) -> str:
    """The word's dictionary entry: of the documents whose headword list starts with it, the one with
    the most synonyms (its most lexicalised sense: "person, individual, someone, ...: a human being",
    not the grammatical category), the first of those."""
    entries = [d for d in docs if d.partition(":")[0].split(",")[0].strip().lower() == word]
    if not entries:
        raise SystemExit(f"no WordNet entry headed by {word!r} in the corpus")
    return max(entries, key=lambda d: len(d.partition(":")[0].split(",")))


def replace_word(text: str, word: str, pseudo: str):
    """(text with every whole-word `word` replaced by `pseudo`, span of the first replacement)."""
    pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
    match = pattern.search(text)
    if match is None:
        return None
    out = pattern.sub(pseudo, text)
    start = pattern.sub(pseudo, text[:match.start()]).__len__()
    return out, start, start + len(pseudo)


def build(seed: int = 0) -> list[dict]:
    docs = corpus_documents()
    rng = np.random.RandomState(seed)
    pools = []
    for w1, w2 in PAIRS:
        pseudo = w1 + w2
        exemplars = []
        for w in (w1, w2):
            text, start, end = replace_word(headword_gloss(docs, w), w, pseudo)
            exemplars.append({"text": text, "start": start, "end": end})
        examples = []
        for label, (w, other) in enumerate(((w1, w2), (w2, w1))):
            found = []
            for d in docs:
                head, _, body = d.partition(":")
                if re.search(rf"\b{other}\b", d, re.IGNORECASE) or re.search(rf"\b{w}\b", head, re.IGNORECASE):
                    continue  # both words, or the word is the entry itself
                r = replace_word(body.strip(), w, pseudo)
                if r is not None:
                    found.append(r)
            order = rng.permutation(len(found))[:MAX_PER_WORD + TEST_PER_WORD]
            for k, i in enumerate(order):
                text, start, end = found[i]
                examples.append({"text": text, "start": start, "end": end, "label": label,
                                 "split": "test" if k < TEST_PER_WORD else "pool"})
        pools.append({"name": pseudo, "words": [w1, w2], "exemplars": exemplars, "examples": examples})
    return pools


def main():
    pools = build()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    write_gzip_text(OUT, "".join(json.dumps(p) + "\n" for p in pools))
    for p in pools:
        counts = np.bincount([e["label"] for e in p["examples"] if e["split"] == "pool"])
        print(f"{p['name']}: pool examples per sense {counts.tolist()}, exemplar: {p['exemplars'][0]['text'][:70]!r}")
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
