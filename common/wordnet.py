"""WordNet 3.0 without a WordNet install: the lexicon shipped as `wordnet_lexicon.json.gz` (built by
data/build_supersense_lexicon.py from Debian's `wordnet-base`; license in WORDNET_LICENSE) and
WordNet's morphy lemmatiser over it, for every package that needs lemmas (SenseBERT's allowed
supersenses, auxiliary tuning's keywords).

The lexicon holds, per part of speech, each lemma's supersense ids (lexicographer files), the
exception lists (*.exc) and morphy's detachment rules.
"""

from __future__ import annotations

import functools
import gzip
import json
import os

LEXICON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wordnet_lexicon.json.gz")
POS = ("noun", "verb", "adj", "adv")

# English stop words (NLTK's list)
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


def lemmas(word: str) -> set[str]:
    """The word and its WordNet base forms (any part of speech), lower case."""
    w = word.lower()
    return {w}.union(*(morphy(w, pos) for pos in POS))


def is_content_word(word: str) -> bool:
    """At least 3 letters, not a stop word, and a WordNet lemma in some part of speech."""
    w = word.lower()
    return len(w) >= 3 and w not in STOP_WORDS and any(morphy(w, p) for p in POS)
