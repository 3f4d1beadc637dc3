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

import jax
import jax.numpy as jnp
import numpy as np

from aux_tuning import (
    AuxTunedLM,
    AuxTuningError,
    held_out_keywords,
    keyword_block,
    keyword_documents,
    keyword_rates,
    keyword_tokens,
    load_frozen_lm,
    sample_keywords,
)
from common.tokenizers import load_tokenizer
from jamba_jax import JambaConfig, generate
from jamba_jax.losses import target_weights
from jamba_jax.params import activation_bytes, forward_bytes_per_token, param_logical_specs
from training.data import example_batches, text_source
from training.task import FrozenInputs, Task


class AuxTuningTask(Task):
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
        self.model = AuxTunedLM(lm_cfg.replace(dtype=aux_cfg.dtype), aux_cfg, tuple(a.feature_layers),
                                bool(a.get("keyword_bag", False)))
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

    def param_specs(self, params):
        return self.model.aux_param_specs()

    def frozen_inputs(self):
        return self._frozen

    def activation_bytes(self, rows: int, seq_len: int, context_shards: int = 1) -> int:
        """The auxiliary model's training step over [keywords][text], plus the frozen LM's forward (no
        backward: one layer's working set and its hidden states at a time)."""
        z = self.config.aux.max_keyword_tokens
        return activation_bytes(self.model.aux_cfg, rows, z + seq_len, context_shards) + (
            rows * seq_len // context_shards * forward_bytes_per_token(self.model.cfg))

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
                "keywords": kw_ids[0], "keyword_mask": kw_mask[0]}

    def documents(self, split: str) -> list[str]:
        return keyword_documents(text_source(self.config.data, split), self.config.aux.skip_words, split)

    def dataset(self, split, train, process_index, process_count):
        c = self.config
        return example_batches(self.documents(split), self.example, batch_size=c.batch_size, seed=c.seed,
                               train=train, process_index=process_index, process_count=process_count)

    # --- loss -----------------------------------------------------------------------------------------------------
    def sums(self, params, batch, rng, frozen):
        """The text's next-token NLL under the combined logits (chunked: no [batch, length, vocab] array)."""
        inputs = batch["inputs"]
        nll = self.model.apply({"params": {"lm": frozen, "aux": params}}, inputs,
                               jnp.pad(inputs[:, 1:], [(0, 0), (0, 1)]), batch["mask"], batch["keywords"],
                               batch["keyword_mask"], method="token_nll")
        w = target_weights(inputs, batch["mask"])
        return {"loss": jnp.sum(nll[:, :-1] * w), "tokens": jnp.sum(w)}

    # --- keyword inclusion ------------------------------------------------------------------------------------
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
        keywords = held_out_keywords(self.documents("validation"), self.config.aux.eval_samples, self.config.seed,
                                     self.config.aux)
        texts = self.sample(params, frozen, keywords, self.config.seed)
        return keyword_rates(texts, keywords)

    def on_end(self, params, frozen):
        kws = [w for w in self.config.get("sample_keywords", "").split(",") if w]
        if kws:
            print(f"sample for {kws}: {self.sample(params, frozen, [kws], self.config.seed)[0]!r}")


Task = AuxTuningTask
