"""Auxiliary tuning on the shared loop: keyword-conditioned generation with a frozen Jamba steered by
a small auxiliary Jamba (`aux_tuning`; Zeldes et al. 2020).

  python main.py --config=configs/aux_tuning_tiny.py --workdir=DIR --config.frozen_lm=LM_DIR

LM_DIR is a `jamba_lm` training workdir, a converted orbax directory or a Hugging Face directory
(optionally ExpertsInt8-quantised on load: `--config.frozen_lm_quantize=experts_int8`); it is only
read. Its parameters are the task's frozen inputs: no gradient, no optimizer state, not in this run's
checkpoints (which record where they came from and a digest; a resume against other weights is
refused).

Data: each document of the corpus with 1 to 3 keywords z sampled from its content words (not stop
words, a WordNet lemma, not among its first `aux.skip_words` words); the auxiliary model reads z as
its own segment before the text; the loss is the text's next-token cross-entropy under the combined
logits. Evaluation adds `eval_keyword_rate`: the fraction of sampled continuations (from <bos>, given
a held-out document's keywords) that contain every keyword, matched by WordNet lemma.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from aux_tuning import AuxTunedLM, AuxTuningError, keyword_block
from jamba_jax import JambaConfig, generate
from jamba_jax.losses import next_token_nll, target_weights
from jamba_jax.params import activation_bytes, param_logical_specs
from sensebert_jax.supersenses import POS, STOP_WORDS, morphy
from tasks.generate import load_checkpoint
from training.checkpoint import INTEGRITY_FILE, restore_run_params
from training.data import document_stream, load_tokenizer, process_rows, text_source
from training.task import FrozenInputs

WORD = re.compile(r"[A-Za-z]+")


# --- keywords --------------------------------------------------------------------------------------
def lemmas(word: str) -> set[str]:
    """The word and its WordNet base forms (any part of speech), lower case."""
    w = word.lower()
    return {w}.union(*(morphy(w, pos) for pos in POS))


def content_words(text: str, skip: int) -> list[str]:
    """Distinct content words of a document after its first `skip` words: at least 3 letters, not a
    stop word, a WordNet lemma in some part of speech (case-insensitive, first occurrence kept)."""
    out, seen = [], set()
    for w in WORD.findall(text)[skip:]:
        lw = w.lower()
        if len(lw) >= 3 and lw not in STOP_WORDS and lw not in seen and any(morphy(lw, p) for p in POS):
            seen.add(lw)
            out.append(lw)
    return out


def contains_keywords(text: str, keywords: list[str]) -> bool:
    """Every keyword appears in the text, matched by WordNet lemma ("stones" matches "stone")."""
    found = set().union(*(lemmas(w) for w in WORD.findall(text))) if text else set()
    return all(lemmas(k) & found for k in keywords)


def sample_keywords(text: str, rng: np.random.Generator, aux_cfg) -> list[str]:
    """min_keywords..max_keywords of the document's content words (config.aux), in text order."""
    words = content_words(text, aux_cfg.skip_words)
    k = int(rng.integers(aux_cfg.min_keywords, min(aux_cfg.max_keywords, len(words)) + 1))
    return [words[i] for i in sorted(rng.choice(len(words), k, replace=False))]


def keyword_tokens(tokenizer, keywords: list[str]) -> list[int]:
    """Each keyword with a leading space, as it is written inside a text (byte-level BPE gives a
    word's first-in-text and mid-text forms different tokens)."""
    return tokenizer.encode("".join(f" {k}" for k in keywords if k.strip()))


# --- the frozen LM -----------------------------------------------------------------------------------
def directory_digest(path: str, step: int | None) -> str:
    """Identifies a checkpoint's bytes cheaply: a training step's integrity record when there is one,
    else every file's path, size and modification time (a model rewritten in place changes it)."""
    h = hashlib.sha256()
    if step is not None:
        root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
        record = os.path.join(root, str(step), INTEGRITY_FILE)
        if os.path.exists(record):
            with open(record, "rb") as f:
                h.update(f.read())
            return h.hexdigest()[:32]
    for dirpath, _, names in sorted(os.walk(path)):
        for name in sorted(names):
            full = os.path.join(dirpath, name)
            st = os.stat(full)
            h.update(f"{os.path.relpath(full, path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def load_frozen_lm(path: str, quantize: str = "") -> tuple[JambaConfig, dict, str, str]:
    """(cfg, params, source, digest) of a causal Jamba to freeze; names what is wrong otherwise."""
    if not path or not os.path.isdir(path):
        raise AuxTuningError(f"config.frozen_lm={path!r} is not a directory: give a jamba_lm training workdir, a "
                             "converted orbax directory or a Hugging Face Jamba directory")
    path = os.path.abspath(path)
    step = None
    if not os.path.exists(os.path.join(path, "config.json")) and not os.path.exists(
            os.path.join(path, "jamba_config.json")):
        meta, _, step = restore_run_params(path, None)
        if meta.get("task", "jamba_lm") != "jamba_lm":
            raise AuxTuningError(f"config.frozen_lm={path} is a {meta.get('task')!r} run, not a causal language "
                                 "model: auxiliary tuning adds logits to a causal Jamba's (a jamba_lm run)")
    cfg, params = load_checkpoint(path, step, quantize or None)
    source = path if step is None else f"{path} (step {step})"
    return cfg, params, source, directory_digest(path, step)


# --- the task ------------------------------------------------------------------------------------------------
class KeywordData:
    """The data half of both keyword tasks (this one and tasks/keyword_lm.py): batches of
    `self.example(document, rng)` over `self.documents(split)`."""

    def train_dataset(self, process_index, process_count):
        return keyword_batches(self.documents("train"), self.example, self.config, True, process_index, process_count)

    def eval_dataset(self, process_index, process_count):
        return keyword_batches(self.documents("validation"), self.example, self.config, False, process_index,
                               process_count)


class AuxTuningTask(KeywordData):
    name = "aux_tuning"

    def __init__(self, config):
        self.config = config
        a = config.aux
        if not 1 <= a.min_keywords <= a.max_keywords:
            raise AuxTuningError(f"config.aux.min_keywords={a.min_keywords}, max_keywords={a.max_keywords}: need "
                                 "1 <= min <= max")
        lm_cfg, lm_params, source, digest = load_frozen_lm(config.frozen_lm, config.get("frozen_lm_quantize", ""))
        fields = dict(config.model.to_dict())
        vocab = fields.pop("vocab_size", -1)
        if vocab not in (-1, lm_cfg.vocab_size):
            raise AuxTuningError(f"config.model.vocab_size={vocab} but the frozen LM's vocabulary has "
                                 f"{lm_cfg.vocab_size} tokens: the two models' logits are added, so they must agree "
                                 "(-1 takes the LM's)")
        aux_cfg = JambaConfig.from_dict({**fields, "vocab_size": lm_cfg.vocab_size})
        self.model = AuxTunedLM(lm_cfg.replace(dtype=aux_cfg.dtype), aux_cfg, tuple(a.feature_layers))
        self.tokenizer = load_tokenizer(config.data.tokenizer, lm_cfg.vocab_size)
        specs = param_logical_specs(lm_cfg, lm_params)
        self._frozen = FrozenInputs(lm_params, source=source, specs=specs, digest=digest)

    # --- contract ------------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"task": self.name, "model": dataclasses.asdict(self.model.aux_cfg),
                "lm": dataclasses.asdict(self.model.cfg), "aux": self.config.aux.to_dict(),
                "tokenizer": self.config.data.tokenizer,
                "frozen_lm_quantize": self.config.get("frozen_lm_quantize", "")}

    def init_params(self, rng):
        return self.model.init_aux(rng)

    def param_specs(self):
        return self.model.aux_param_specs()

    def frozen_inputs(self):
        return self._frozen

    def activation_bytes(self, rows: int, seq_len: int) -> int:
        z = self.config.aux.max_keyword_tokens
        lm_forward = rows * seq_len * self.model.cfg.vocab_size * 4 * 2  # its logits, kept as data
        return activation_bytes(self.model.aux_cfg, rows, z + seq_len) + lm_forward

    # --- data -------------------------------------------------------------------------------------------------
    def example(self, text: str, rng: np.random.Generator) -> dict:
        """One row: the document (<bos> text <eos>, cut or right-padded to seq_len) and its keywords."""
        a, n, tok = self.config.aux, self.config.seq_len, self.tokenizer
        chosen = sample_keywords(text, rng, a)
        ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
        ids = ids[:n]
        kw_ids, kw_mask = keyword_block([keyword_tokens(tok, chosen)], a.max_keyword_tokens, tok.pad_id)
        return {"inputs": np.asarray(ids + [tok.pad_id] * (n - len(ids)), np.int32),
                "mask": np.asarray([1] * len(ids) + [0] * (n - len(ids)), np.int32),
                "keywords": kw_ids[0], "keyword_mask": kw_mask[0],
                "keyword_text": np.asarray(" ".join(chosen))}

    def documents(self, split: str) -> list[str]:
        skip = self.config.aux.skip_words
        docs = [d for d in text_source(self.config.data, split) if content_words(d, skip)]
        if not docs:
            raise AuxTuningError(f"no {split} document has a content word to use as a keyword")
        return docs

    # --- loss -----------------------------------------------------------------------------------------------------
    def _nll(self, params, batch, frozen):
        out = self.model.apply({"params": {"lm": frozen, "aux": params}}, batch["inputs"],
                               attention_mask=batch["mask"], keyword_ids=batch["keywords"],
                               keyword_mask=batch["keyword_mask"])
        w = target_weights(batch["inputs"], batch["mask"])
        return jnp.sum(next_token_nll(out.logits, batch["inputs"]) * w), jnp.sum(w)

    def loss(self, params, batch, rng, frozen):
        nll, tokens = self._nll(params, batch, frozen)
        return nll, {"loss": nll, "tokens": tokens}

    def eval_sums(self, params, batch, frozen):
        nll, tokens = self._nll(params, batch, frozen)
        return {"nll": nll, "tokens": tokens}

    # --- keyword inclusion ------------------------------------------------------------------------------------
    def eval_examples(self, n: int) -> list[dict]:
        """The first n held-out documents with their (seeded) keywords."""
        rng = np.random.default_rng(self.config.seed + 1)
        return [self.example(d, rng) for d in self.documents("validation")[:n]]

    def sample(self, params, frozen, keyword_lists: list[list[str]], seed: int, prompt_ids=None) -> list[str]:
        """Sampled continuations (config.aux: sample_tokens, temperature, top_k) from <bos> (or the
        prompt) given each row's keywords."""
        a, tok = self.config.aux, self.tokenizer
        tokens = [keyword_tokens(tok, kws) for kws in keyword_lists]
        if not all(tokens):
            bad = [kws for kws, t in zip(keyword_lists, tokens, strict=True) if not t]
            raise AuxTuningError(f"keywords {bad} tokenize to nothing")
        kw_ids, kw_mask = keyword_block(tokens, a.max_keyword_tokens, tok.pad_id)
        prompt = np.asarray(prompt_ids if prompt_ids is not None else [[tok.bos_id]] * len(keyword_lists), np.int32)
        variables = {"lm": frozen, "aux": params}
        cache = self.model.start_cache(variables, kw_ids, kw_mask, prompt.shape[1] + a.sample_tokens)
        out = generate(self.model, variables, prompt, max_new_tokens=a.sample_tokens, temperature=a.temperature,
                       top_k=a.top_k or None, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                       rng=jax.random.PRNGKey(seed), cache=cache)
        return [tok.decode([t for t in row if t not in (tok.pad_id, tok.eos_id)]) for row in out]

    def extra_eval(self, params, frozen) -> dict:
        """eval_keyword_rate over config.aux.eval_samples held-out documents."""
        examples = self.eval_examples(self.config.aux.eval_samples)
        keywords = [str(ex["keyword_text"]).split() for ex in examples]
        texts = self.sample(params, frozen, keywords, self.config.seed)
        return {"keyword_rate": float(np.mean([contains_keywords(t, k) for t, k in zip(texts, keywords, strict=True)]))}

    def on_end(self, params, frozen):
        kws = [w for w in self.config.get("sample_keywords", "").split(",") if w]
        if kws:
            print(f"sample for {kws}: {self.sample(params, frozen, [kws], self.config.seed)[0]!r}")


Task = AuxTuningTask


def keyword_batches(documents, example, config, train: bool, process_index: int, process_count: int):
    """This process's batches of `example(document, rng)` dicts (their keyword text dropped), the
    documents shuffled per epoch when training: the data of both keyword tasks."""
    ds = document_stream(documents, config.batch_size, config.seed, train, process_count)
    ds = ds.random_map(example, seed=config.seed)
    ds = ds.map(lambda ex: {k: v for k, v in ex.items() if k != "keyword_text"})
    ds = ds.batch(config.batch_size, drop_remainder=train)
    return ds.map(lambda b: process_rows(b, config.batch_size, process_index, process_count)).to_iter_dataset()
