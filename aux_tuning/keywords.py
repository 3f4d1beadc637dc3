"""The conditioning of keyword-controlled generation (Zeldes et al. 2020, section 4): keywords drawn
from a document's content words, their tokens as the model sees them, and whether a text contains
them (matched by WordNet lemma, `common.wordnet`)."""

from __future__ import annotations

import re

import numpy as np

from common.errors import UserError
from common.wordnet import is_content_word, lemmas

WORD = re.compile(r"[A-Za-z]+")


class KeywordError(UserError):
    """Text or keywords that cannot condition generation."""


def content_words(text: str, skip: int) -> list[str]:
    """Distinct content words (`common.wordnet.is_content_word`) of a document after its first `skip`
    words, lower case, first occurrence kept."""
    out, seen = [], set()
    for w in WORD.findall(text)[skip:]:
        lw = w.lower()
        if lw not in seen and is_content_word(lw):
            seen.add(lw)
            out.append(lw)
    return out


def keyword_documents(docs, skip: int, split: str) -> list[str]:
    """The documents with a content word to draw keywords from (UserError naming the split if none)."""
    out = [d for d in docs if content_words(d, skip)]
    if not out:
        raise KeywordError(f"no {split} document has a content word to use as a keyword")
    return out


def held_out_keywords(docs: list[str], n: int, seed: int, aux_cfg) -> list[list[str]]:
    """The keywords the evaluation conditions on: drawn from the first n held-out documents with seed + 1,
    the same for every method compared."""
    rng = np.random.default_rng(seed + 1)
    return [sample_keywords(d, rng, aux_cfg) for d in docs[:n]]


def _keywords_found(text: str, keywords: list[str]) -> list[bool]:
    """Per keyword: whether the text holds it, matched by WordNet lemma (the text's lemmas gathered once)."""
    found = set().union(*(lemmas(w) for w in WORD.findall(text))) if text else set()
    return [bool(lemmas(k) & found) for k in keywords]


def contains_keywords(text: str, keywords: list[str]) -> bool:
    """Every keyword appears in the text, matched by WordNet lemma ("stones" matches "stone")."""
    return all(_keywords_found(text, keywords))


def keyword_rates(texts: list[str], keyword_lists: list[list[str]]) -> dict[str, float]:
    """{"keyword_rate": fraction of texts with every one of their keywords, "any_keyword_rate": with at
    least one}, matched by WordNet lemma."""
    hits = [_keywords_found(t, k) for t, k in zip(texts, keyword_lists, strict=True)]
    return {"keyword_rate": float(np.mean([all(h) for h in hits])),
            "any_keyword_rate": float(np.mean([any(h) for h in hits]))}


def sample_keywords(text: str, rng: np.random.Generator, aux_cfg) -> list[str]:
    """min_keywords..max_keywords of the document's content words (config.aux), in text order."""
    words = content_words(text, aux_cfg.skip_words)
    k = int(rng.integers(aux_cfg.min_keywords, min(aux_cfg.max_keywords, len(words)) + 1))
    return [words[i] for i in sorted(rng.choice(len(words), k, replace=False))]


def keyword_tokens(tokenizer, keywords: list[str]) -> list[int]:
    """Each keyword with a leading space, as it is written inside a text (byte-level BPE gives a
    word's first-in-text and mid-text forms different tokens)."""
    return tokenizer.encode("".join(f" {k}" for k in keywords if k.strip()))


def keyword_block(token_lists: list[list[int]], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Keyword token lists left-padded (and cut on the left) to `length`: (ids [B, length], mask)."""
    ids = np.full((len(token_lists), length), pad_id, np.int32)
    mask = np.zeros((len(token_lists), length), np.int32)
    for r, toks in enumerate(token_lists):
        toks = list(toks)[-length:]
        if toks:
            ids[r, length - len(toks):] = toks
            mask[r, length - len(toks):] = 1
    return ids, mask
