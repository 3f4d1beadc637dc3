"""WordNet supersenses (the 45 lexicographer files) and the allowed set A(w) of a word.

A(w) (SenseBERT, section 3.1) holds the supersenses of every synset of every lemma of w: w is
lemmatised with WordNet's morphy (exception lists, then detachment rules, for each part of
speech) against the shipped lexicon `lexicon.json.gz` (built from WordNet 3.0 by
data/build_supersense_lexicon.py). As in the paper, A(w) is empty for words of 3 characters or
fewer, for stop words and for word-piece continuations ("##...").
"""

from __future__ import annotations

import functools
import gzip
import json
import os

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
LEXICON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lexicon.json.gz")
POS = ("noun", "verb", "adj", "adv")

# English stop words (NLTK's list): function words get no supersense target
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself it
its itself they them their theirs themselves what which who whom this that these those am is are was were be been
being have has had having do does did doing a an the and but if or because as until while of at by for with about
against between into through during before after above below to from up down in out on off over under again
further then once here there when where why how all any both each few more most other some such no nor not only
own same so than too very s t can will just don should now d ll m o re ve y ain aren couldn didn doesn hadn hasn
haven isn ma mightn mustn needn shan shouldn wasn weren won wouldn also would could might must shall upon
""".split())


@functools.lru_cache(maxsize=1)
def lexicon() -> dict:
    with gzip.open(LEXICON, "rt", encoding="utf-8") as f:
        return json.load(f)


def morphy(word: str, pos: str) -> list[str]:
    """WordNet's base forms of `word` as part of speech `pos` that the lexicon holds (morph.c:
    the word itself, its exception-list bases, else every detachment rule's result)."""
    lex = lexicon()
    table = lex["lemmas"][pos]
    word = word.lower()
    exc = lex["exceptions"][pos].get(word)
    if exc is not None:
        candidates = [word] + exc
    else:
        candidates = [word] + [word[: len(word) - len(suffix)] + repl
                               for suffix, repl in lex["detachment_rules"][pos] if word.endswith(suffix)]
    seen: list[str] = []
    for c in candidates:
        if c in table and c not in seen:
            seen.append(c)
    return seen


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
