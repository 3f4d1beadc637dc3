"""The keyword-bag term for a whole LM: the baselines of auxiliary tuning (a keyword-prefixed LM,
fine-tuned or trained from scratch) with the same position-independent term the auxiliary model may
add (`aux_tuning.model`, `keyword_bag`), so that an ablation with and without it compares like with like:

    logits(v) = LM logits(v) + sqrt(E) <g * bag / |bag|, E[v] / |E[v]|>,   bag = mean_k E[z_k]

E is the LM's own token embedding table, g a trained gain per hidden unit that starts at zero (so at
step 0 the model is exactly the LM).

`KeywordBagLM` is a plain object over params {"lm": the Jamba's, "bag_scale": [E]} with the entry
points `jamba_jax.generate` drives (`apply(variables, ..., method=...)`):

  token_nll   -log p(targets) [B, L] of text whose keywords are given, a chunk at a time  -> [B, L] float32
  prefill     a chunk of text into a BagCache (which holds the keywords' bag); last logits -> StepOutput
  decode      one token per row into a BagCache                                             -> StepOutput
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp

from aux_tuning.model import bag_logits, keyword_bag
from common.losses import chunked_nll
from jamba_jax import HybridCache, JambaConfig, JambaForCausalLM, StepOutput
from jamba_jax.params import param_logical_specs

_F32 = jnp.float32


@flax.struct.dataclass
class BagCache:
    lm: HybridCache
    bag: jax.Array  # [B, E] float32: the mean of the keywords' embeddings


def _logits_with_bag(shared, hidden_BxCxE):
    head, bag_BxV = shared
    return (hidden_BxCxE @ head).astype(_F32) + bag_BxV[:, None]


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static argument of jitted steps
class KeywordBagLM:
    cfg: JambaConfig

    @property
    def lm(self) -> JambaForCausalLM:
        return JambaForCausalLM(self.cfg)

    @staticmethod
    def wrap(lm_params) -> dict:
        """{"lm": lm_params, "bag_scale": zeros}: the LM with a bag term that starts at zero."""
        table = lm_params["model"]["embed_tokens"]["embedding"]
        return {"lm": lm_params, "bag_scale": jnp.zeros((table.shape[-1],), _F32)}

    def param_specs(self) -> dict:
        return {"lm": param_logical_specs(self.cfg), "bag_scale": jax.sharding.PartitionSpec(None)}

    def _bag_logits(self, params, bag_BxE):
        return bag_logits({"model": params["lm"], "bag_scale": params["bag_scale"]}, bag_BxE)

    def init_cache(self, batch: int, max_length: int, dtype=None) -> BagCache:
        return BagCache(self.lm.init_cache(batch, max_length, dtype), jnp.zeros((batch, self.cfg.hidden_size), _F32))

    def start_cache(self, params, keyword_ids, keyword_mask, batch: int, max_length: int, dtype=None) -> BagCache:
        """An empty cache whose bag holds each row's keywords."""
        return self.init_cache(batch, max_length, dtype).replace(
            bag=keyword_bag(params["lm"], jnp.asarray(keyword_ids), jnp.asarray(keyword_mask)))

    def apply(self, variables, *args, method: str, **kwargs):
        entry = {"token_nll": self._token_nll, "prefill": self._prefill, "decode": self._decode}
        if method not in entry:
            raise ValueError(f"KeywordBagLM has no entry point {method!r}; it has {sorted(entry)}")
        return entry[method](variables["params"], *args, **kwargs)

    def _token_nll(self, params, input_ids, targets, attention_mask, keyword_ids, keyword_mask):
        out = self.lm.apply({"params": params["lm"]}, input_ids, attention_mask, method="hidden")
        bag = self._bag_logits(params, keyword_bag(params["lm"], keyword_ids, keyword_mask))
        return chunked_nll(_logits_with_bag, (out.hidden,), (out.head, bag), targets, self.cfg.vocab_size)

    def _prefill(self, params, input_ids, cache: BagCache, attention_mask=None) -> StepOutput:
        out = self.lm.apply({"params": params["lm"]}, input_ids, cache.lm, attention_mask, method="prefill")
        return StepOutput(out.logits.astype(_F32) + self._bag_logits(params, cache.bag), cache.replace(lm=out.cache))

    def _decode(self, params, token_ids_B, cache: BagCache) -> StepOutput:
        return self._prefill(params, token_ids_B[:, None], cache)
