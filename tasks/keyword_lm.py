"""Keyword-conditioned generation the plain way, the baselines auxiliary tuning is measured against:
a Jamba LM reading each document after a keyword prefix,

    <bos> " kw1 kw2 kw3" "\\n" text <eos>        (the loss counts the text only)

trained from scratch (`config.init_from = ""`) or fine-tuned in full from a `jamba_lm` checkpoint
(`config.init_from = DIR`). With `config.num_train_steps = 0` it only evaluates: the frozen LM alone,
the keywords as a text prompt. With `config.aux.keyword_bag` the LM also gets the keyword-bag term
(`aux_tuning.keyword_bag`), as the auxiliary model may. Keywords, data and the evaluation (eval_loss of
the text given the keywords, eval_keyword_rate and eval_any_keyword_rate of sampled continuations) are
those of the `aux_tuning` task.

  python main.py --config=configs/keyword_lm_tiny.py --config.init_from=workdir
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from aux_tuning import (
    held_out_keywords,
    keyword_block,
    keyword_documents,
    keyword_rates,
    keyword_tokens,
    sample_keywords,
)
from aux_tuning.keyword_bag import KeywordBagLM
from common.tokenizers import load_tokenizer
from jamba_jax import ConfigError, JambaConfig, JambaForCausalLM, generate, init_params, load_checkpoint
from jamba_jax.params import activation_bytes, param_logical_specs
from training.data import example_batches, text_source
from training.task import Task


class KeywordLMTask(Task):
    name = "keyword_lm"

    def __init__(self, config):
        self.config = config
        self._start = None
        if config.init_from:
            cfg, params = load_checkpoint(config.init_from)
            self._start = jax.tree.map(np.asarray, params)
            fields = dict(config.model.to_dict())
            if fields.get("vocab_size", -1) not in (-1, cfg.vocab_size):
                raise ConfigError(f"config.model.vocab_size={fields['vocab_size']} but {config.init_from} has "
                                  f"{cfg.vocab_size} tokens")
            self.cfg = cfg.replace(dtype=fields.get("dtype", cfg.dtype))
        else:
            self.cfg = JambaConfig.from_dict(config.model.to_dict())
        self.bag = bool(config.aux.get("keyword_bag", False))
        self.model = KeywordBagLM(self.cfg) if self.bag else JambaForCausalLM(self.cfg)
        self.tokenizer = load_tokenizer(config.data.tokenizer, self.cfg.vocab_size)
        self.newline = self.tokenizer.encode("\n")

    def meta(self) -> dict:
        return {"task": self.name, "model": dataclasses.asdict(self.cfg), "aux": self.config.aux.to_dict(),
                "init_from": self.config.init_from}

    def init_params(self, rng):
        lm = jax.tree.map(jnp.asarray, self._start) if self._start is not None else init_params(self.cfg, rng)
        return KeywordBagLM.wrap(lm) if self.bag else lm

    def param_specs(self, params):
        return self.model.param_specs() if self.bag else param_logical_specs(self.cfg)

    def activation_bytes(self, rows: int, seq_len: int, context_shards: int = 1) -> int:
        return activation_bytes(self.cfg, rows, seq_len + self.config.aux.max_keyword_tokens, context_shards)

    # --- data ---------------------------------------------------------------------------------------------------
    def prefix(self, keywords: list[str]) -> list[int]:
        tok = self.tokenizer
        return [tok.bos_id] + keyword_tokens(tok, keywords)[-self.config.aux.max_keyword_tokens:] + self.newline

    def example(self, text: str, rng: np.random.Generator) -> dict:
        """[prefix][text <eos>] cut or right-padded to max_keyword_tokens + seq_len + 2; weights on the text."""
        tok, n = self.tokenizer, self.config.seq_len + self.config.aux.max_keyword_tokens + 1 + len(self.newline)
        chosen = sample_keywords(text, rng, self.config.aux)
        prefix = self.prefix(chosen)
        ids = (prefix + tok.encode(text) + [tok.eos_id])[:n]
        targets = np.zeros((n,), np.float32)
        targets[len(prefix):len(ids)] = 1.0  # position t is a target when token t belongs to the text
        row = {"inputs": np.asarray(ids + [tok.pad_id] * (n - len(ids)), np.int32),
               "mask": np.asarray([1] * len(ids) + [0] * (n - len(ids)), np.int32), "targets": targets}
        if self.bag:  # the bag term reads the keywords on their own
            kw_ids, kw_mask = keyword_block([keyword_tokens(tok, chosen)], self.config.aux.max_keyword_tokens,
                                            tok.pad_id)
            row.update(keywords=kw_ids[0], keyword_mask=kw_mask[0])
        return row

    def dataset(self, split, train, process_index, process_count):
        c = self.config
        docs = keyword_documents(text_source(c.data, split), c.aux.skip_words, split)
        return example_batches(docs, self.example, batch_size=c.batch_size, seed=c.seed, train=train,
                               process_index=process_index, process_count=process_count)

    # --- loss ---------------------------------------------------------------------------------------------------------
    def sums(self, params, batch, rng, frozen):
        """The text's next-token NLL (the model's chunked `token_nll`: no [batch, length, vocab] array)."""
        inputs = batch["inputs"]
        targets = jnp.pad(inputs[:, 1:], [(0, 0), (0, 1)])
        if self.bag:
            nll = self.model.apply({"params": params}, inputs, targets, batch["mask"], batch["keywords"],
                                   batch["keyword_mask"], method="token_nll")
        else:
            nll = self.model.apply({"params": params}, inputs, targets, batch["mask"], method="token_nll").token_nll
        w = batch["targets"][:, 1:]  # the target of position t is token t + 1
        return {"loss": jnp.sum(nll[:, :-1] * w), "tokens": jnp.sum(w)}

    # --- keyword inclusion ---------------------------------------------------------------------------------------
    def extra_eval(self, params, frozen) -> dict:
        """eval_keyword_rate: continuations sampled after each held-out document's keyword prefix (the
        same documents, keywords and sampling as the aux_tuning task's)."""
        a, tok = self.config.aux, self.tokenizer
        docs = keyword_documents(text_source(self.config.data, "validation"), a.skip_words, "validation")
        keywords = held_out_keywords(docs, a.eval_samples, self.config.seed, a)
        prefixes = [self.prefix(k) for k in keywords]
        width = max(len(p) for p in prefixes)
        ids = np.full((len(prefixes), width), tok.pad_id, np.int32)
        mask = np.zeros_like(ids)
        for r, p in enumerate(prefixes):  # left-padded prompts
            ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
        cache = None
        if self.bag:
            kw_ids, kw_mask = keyword_block([keyword_tokens(tok, k) for k in keywords], a.max_keyword_tokens,
                                            tok.pad_id)
            cache = self.model.start_cache(params, kw_ids, kw_mask, len(prefixes), width + a.sample_tokens)
        out = generate(self.model, params, ids, attention_mask=mask, max_new_tokens=a.sample_tokens,
                       temperature=a.temperature, top_k=a.top_k or None, eos_token_id=tok.eos_id,
                       pad_token_id=tok.pad_id, rng=jax.random.PRNGKey(self.config.seed), cache=cache)
        texts = [tok.decode([t for t in row if t not in (tok.pad_id, tok.eos_id)]) for row in out]
        return keyword_rates(texts, keywords)


Task = KeywordLMTask
