"""WordNet supersenses (the 45 lexicographer files) and the allowed set A(w) of a word.

A(w) (SenseBERT, section 3.1) holds the supersenses of every synset of every lemma of w: w is
lemmatised with WordNet's morphy (exception lists, then detachment rules, for each part of
speech) against the shipped lexicon (`common.wordnet`). As in the paper, A(w) is empty for words of
3 characters or fewer, for stop words and for word-piece continuations ("##...").
"""

from __future__ import annotations

import functools

from common.wordnet import POS, STOP_WORDS, lexicon, morphy

# WordNet's lexnames file, in order: index i is lexicographer file i
SUPERSENSES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
NUM_SUPERSENSES = len(SUPERSENSES)


@functools.lru_cache(maxsize=200_000)
def allowed_ids(word: str) -> tuple[int, ...]:
    """Sorted supersense ids of A(word)."""
    if word.startswith("##") or len(word) <= 3 or word.lower() in STOP_WORDS:
        return ()
    lemmas = lexicon()["lemmas"]
    out: set[int] = set()
    for pos in POS:
        for base in morphy(word, pos):
            out.update(lemmas[pos][base])
    return tuple(sorted(out))


def allowed_supersenses(word: str) -> tuple[str, ...]:
    """A(word) as supersense names, e.g. allowed_supersenses("dogs") -> ('noun.animal', 'noun.person', ...)."""
    return tuple(SUPERSENSES[i] for i in allowed_ids(word))
