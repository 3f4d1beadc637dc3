"""Auxiliary tuning (Zeldes, Padnos, Sharir, Peleg, "Technical Report: Auxiliary Tuning and its
Application to Conditional Text Generation", AI21 Labs 2020, arXiv 2006.16823).

    p(x_t | x_<t, z) = softmax(logits_LM(x_t | x_<t) + logits_aux(x_t | x_<t, z))

The pre-trained LM is frozen; only the auxiliary model trains, by maximum likelihood of the target
text. By Bayes, p(x_t | x_<t, z) is proportional to p(z | x_<=t) p(x_t | x_<t), so the auxiliary
logits learn log p(z | x_<=t) up to a constant: a small model suffices.

Here the auxiliary model is a small Jamba (`jamba_jax.JambaForCausalLM` of its own config, the LM's
vocabulary). The conditioning input z (keywords) enters it alone, as its own token segment before
the text: its input is [z left-padded to a fixed length][text], and its logits at the text positions
are added to the LM's. Optionally it also reads the frozen LM's hidden states at chosen layers,
each projected to its width and added to its input embeddings at the text positions (the report's
reuse of intermediate LM features). A keyword-bag term (optional, `keyword_bag`; off in the benchmark's
main comparison) adds g cos(mean_k E[z_k], E[v]) to the logit
of every token v at every position (E: the auxiliary model's token embeddings, g a learned gain per
hidden unit of the normalised bag): the position-independent part of log p(z | x_<=t), which a
Jamba body only finds after long training. Every output path starts at zero, so at step 0 the
combined model is exactly the LM: g (when present), and the body's output projection (its final norm's scale with
tied embeddings, the default; else its lm_head).

`AuxTunedLM` is a plain object over params {"lm": frozen, "aux": trained} with the entry points of a
Linen LM, through `apply(variables, ..., method=...)` as `jamba_jax.generate` drives them:

  __call__    combined logits [B, L, V] of the text, given its keywords             -> AuxOutput
  token_nll   -log p(targets) [B, L] under the combined model, a chunk at a time     -> [B, L] float32
  prefill     a chunk of text into an AuxCache (keywords already in it); last logits -> StepOutput
  decode      one token per row into an AuxCache                                     -> StepOutput
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from common.errors import UserError
from common.layers import Dense, normal_init
from common.losses import chunked_nll
from jamba_jax import HybridCache, JambaConfig, JambaForCausalLM, StepOutput, init_params
from jamba_jax.layout import layer_output
from jamba_jax.params import param_logical_specs

_F32 = jnp.float32


class AuxTuningError(UserError):
    """A frozen LM and an auxiliary model (or keywords) that cannot be combined as asked."""


@flax.struct.dataclass
class AuxOutput:
    logits: jax.Array  # [B, L, V] float32: LM logits + auxiliary logits
    lm_logits: jax.Array  # [B, L, V]: the frozen LM's alone
    aux_logits: jax.Array  # [B, L, V] float32: the auxiliary model's alone


@flax.struct.dataclass
class AuxCache:
    lm: HybridCache  # the frozen LM's, over the text
    aux: HybridCache  # the auxiliary model's, holding the keyword segment first
    bag: jax.Array  # [B, E_aux] float32: the mean of the keywords' embeddings


class FeatureProjection(nn.Module):
    """The frozen LM's hidden states at `layers`, each projected to the auxiliary model's width and summed."""

    layers: tuple[int, ...]
    features: int
    dtype: Any

    @nn.compact
    def __call__(self, hidden_by_layer):
        out = 0.0
        for layer, h in zip(self.layers, hidden_by_layer, strict=True):
            out = out + Dense(self.features, ("embed", "embed_aux"), dtype=self.dtype, param_dtype=_F32,
                              kernel_init=normal_init(0.02), name=f"layer_{layer}")(h)
        return out


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static argument of jitted steps
class AuxTunedLM:
    cfg: JambaConfig  # the frozen LM's config (its vocabulary is the combined model's)
    aux_cfg: JambaConfig
    feature_layers: tuple[int, ...] = ()  # frozen LM layers whose outputs feed the auxiliary model
    keyword_bag: bool = False  # add the keyword-bag term (module docstring) to the auxiliary logits

    def __post_init__(self):
        if self.aux_cfg.vocab_size != self.cfg.vocab_size:
            raise AuxTuningError(f"the auxiliary model's vocab_size ({self.aux_cfg.vocab_size}) differs from the "
                                 f"frozen LM's ({self.cfg.vocab_size}); their logits must share a vocabulary")
        bad = [i for i in self.feature_layers if not 0 <= i < self.cfg.num_hidden_layers]
        if bad:
            raise AuxTuningError(f"feature layers {bad} do not exist in the frozen LM "
                                 f"({self.cfg.num_hidden_layers} layers)")

    @property
    def lm(self) -> JambaForCausalLM:
        return JambaForCausalLM(self.cfg)

    @property
    def aux(self) -> JambaForCausalLM:
        return JambaForCausalLM(self.aux_cfg)

    @property
    def projection(self) -> FeatureProjection:
        return FeatureProjection(self.feature_layers, self.aux_cfg.hidden_size, self.aux_cfg.compute_dtype)

    # --- parameters ----------------------------------------------------------------------------
    def init_aux(self, rng) -> dict:
        """The trainable parameters {"model": the auxiliary Jamba (its output projection zero),
        "bag_scale", "projection" (when there are feature layers)}, plain (unboxed) arrays."""
        k_aux, k_proj = jax.random.split(rng)
        aux = init_params(self.aux_cfg, k_aux)
        if self.aux_cfg.tie_word_embeddings:  # logits = (scale * norm(h)) E^T: zero scale, zero projection
            body = dict(aux["model"])
            body["final_layernorm"] = {"scale": jnp.zeros_like(body["final_layernorm"]["scale"])}
            aux = {**aux, "model": body}
        else:
            aux = {**aux, "lm_head": jnp.zeros_like(aux["lm_head"])}
        out = {"model": aux}
        if self.keyword_bag:
            out["bag_scale"] = jnp.zeros((self.aux_cfg.hidden_size,), _F32)
        if self.feature_layers:
            h = [jnp.zeros((1, 1, self.cfg.hidden_size), self.cfg.compute_dtype)] * len(self.feature_layers)
            out["projection"] = nn.unbox(self.projection.init(k_proj, h)["params"])
        return out

    def aux_param_specs(self) -> dict:
        """Logical PartitionSpecs of the trainable parameters (for the mesh)."""
        specs = {"model": param_logical_specs(self.aux_cfg)}
        if self.keyword_bag:
            specs["bag_scale"] = jax.sharding.PartitionSpec(None)
        if self.feature_layers:
            h = [jax.ShapeDtypeStruct((1, 1, self.cfg.hidden_size), self.cfg.compute_dtype)] * len(self.feature_layers)
            specs["projection"] = nn.get_partition_spec(jax.eval_shape(self.projection.init, jax.random.PRNGKey(0),
                                                                       h)["params"])
        return specs

    # --- cache -------------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_length: int, dtype=None, keyword_length: int = 0) -> AuxCache:
        return AuxCache(self.lm.init_cache(batch, max_length, dtype),
                        self.aux.init_cache(batch, keyword_length + max_length, dtype),
                        jnp.zeros((batch, self.aux_cfg.hidden_size), _F32))

    def start_cache(self, params, keyword_ids, keyword_mask, max_length: int, dtype=None) -> AuxCache:
        """A cache whose auxiliary part already holds the keyword segment (the text continues after it)."""
        keyword_ids = jnp.asarray(keyword_ids, jnp.int32)
        cache = self.init_cache(keyword_ids.shape[0], max_length, dtype, keyword_ids.shape[1])
        aux_cache = _keyword_prefill(self, params["aux"]["model"], cache.aux, keyword_ids, jnp.asarray(keyword_mask))
        bag = keyword_bag(params["aux"]["model"], keyword_ids, jnp.asarray(keyword_mask))
        return cache.replace(aux=aux_cache, bag=bag)

    # --- entry points ----------------------------------------------------------------------------------
    def apply(self, variables, *args, method: str = "__call__", **kwargs):
        """The entry point `method` (module docstring) with variables {"params": {"lm", "aux"}}."""
        entry = {"__call__": self._logits, "token_nll": self._token_nll, "prefill": self._prefill,
                 "decode": self._decode}
        if method not in entry:
            raise ValueError(f"AuxTunedLM has no entry point {method!r}; it has {sorted(entry)}")
        return entry[method](variables["params"], *args, **kwargs)

    def _lm_features(self, frozen, method: str, *args, **kwargs):
        """(the frozen LM's output of `method`, the auxiliary model's embedding offsets [B, L, E_aux] or None)."""
        if not self.feature_layers:
            return self.lm.apply({"params": frozen}, *args, method=method, **kwargs), None
        out, captured = self.lm.apply({"params": frozen}, *args, method=method, mutable=["hidden_states"], **kwargs)
        return out, captured["hidden_states"]

    def _offsets(self, trained, captured):
        if captured is None:
            return None
        hidden = [jax.lax.stop_gradient(layer_output(self.cfg, captured, i)) for i in self.feature_layers]
        return self.projection.apply({"params": trained["projection"]}, hidden)

    def _text_features(self, params, input_ids, attention_mask, keyword_ids, keyword_mask):
        """(the LM's HiddenOutput of the text, the auxiliary model's hidden [B, L, E_aux] at the text positions
        and its head, the bag logits [B, V] or None)."""
        frozen, trained = jax.lax.stop_gradient(params["lm"]), params["aux"]
        if keyword_ids is None:
            raise AuxTuningError("auxiliary tuning needs the conditioning keywords (keyword_ids) or a cache "
                                 "that holds them")
        input_ids, keyword_ids = jnp.asarray(input_ids, jnp.int32), jnp.asarray(keyword_ids, jnp.int32)
        text_mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
        kw_mask = jnp.ones(keyword_ids.shape, bool) if keyword_mask is None else jnp.asarray(keyword_mask, bool)
        lm_out, captured = self._lm_features(frozen, "hidden", input_ids, attention_mask)
        offsets = self._offsets(trained, captured)
        if offsets is not None:  # nothing is added at the keyword positions
            offsets = jnp.concatenate([jnp.zeros(keyword_ids.shape + offsets.shape[-1:], offsets.dtype), offsets],
                                      axis=1)
        aux_out = self.aux.apply({"params": trained["model"]}, jnp.concatenate([keyword_ids, input_ids], axis=1),
                                 jnp.concatenate([kw_mask, text_mask], axis=1), None, offsets, method="hidden")
        bag = self._bag_logits(trained, keyword_bag(trained["model"], keyword_ids, kw_mask))
        return lm_out, aux_out.hidden[:, -input_ids.shape[1]:], aux_out.head, bag

    def _logits(self, params, input_ids, attention_mask=None, keyword_ids=None, keyword_mask=None) -> AuxOutput:
        """Combined logits of the text `input_ids` [B, L], its keywords `keyword_ids` [B, Z] (left-padded,
        `keyword_mask` 1 on real tokens) first in the auxiliary model's input."""
        lm_out, aux_hidden, aux_head, bag = self._text_features(params, input_ids, attention_mask, keyword_ids,
                                                                keyword_mask)
        lm_logits = lm_out.hidden @ lm_out.head
        aux_logits = _with_bag((aux_hidden @ aux_head).astype(_F32), bag)
        return AuxOutput(logits=lm_logits.astype(_F32) + aux_logits, lm_logits=lm_logits, aux_logits=aux_logits)

    def _token_nll(self, params, input_ids, targets, attention_mask=None, keyword_ids=None, keyword_mask=None):
        """-log p(targets [B, L]) [B, L] float32 under the combined logits, without a [B, L, V] array
        (`common.losses.chunked_nll`)."""
        lm_out, aux_hidden, aux_head, bag = self._text_features(params, input_ids, attention_mask, keyword_ids,
                                                                keyword_mask)
        return chunked_nll(_combined_logits, (lm_out.hidden, aux_hidden), (lm_out.head, aux_head, bag), targets,
                           self.cfg.vocab_size)

    def _prefill(self, params, input_ids, cache: AuxCache, attention_mask=None) -> StepOutput:
        """A chunk of text [B, L] into the cache (which holds the keywords): last-position logits, the cache."""
        frozen, trained = jax.lax.stop_gradient(params["lm"]), params["aux"]
        input_ids = jnp.asarray(input_ids, jnp.int32)
        lm_out, captured = self._lm_features(frozen, "prefill", input_ids, cache.lm, attention_mask)
        aux_out = self.aux.apply({"params": trained["model"]}, input_ids, cache.aux, attention_mask,
                                 self._offsets(trained, captured), method="prefill")
        aux_logits, bag = aux_out.logits.astype(_F32), self._bag_logits(trained, cache.bag)
        aux_logits = aux_logits if bag is None else aux_logits + bag
        return StepOutput(lm_out.logits.astype(_F32) + aux_logits, cache.replace(lm=lm_out.cache, aux=aux_out.cache))

    def _decode(self, params, token_ids_B, cache: AuxCache) -> StepOutput:
        return self._prefill(params, token_ids_B[:, None], cache)

    def _bag_logits(self, trained, bag_BxE):
        """[B, V] float32: the keyword-bag term, or None without it (nothing is added)."""
        return bag_logits(trained, bag_BxE) if self.keyword_bag else None


def _with_bag(logits_BxCxV, bag_BxV):
    """Logits plus the keyword-bag term at every position (the logits themselves without one)."""
    return logits_BxCxV if bag_BxV is None else logits_BxCxV + bag_BxV[:, None]


def _combined_logits(shared, lm_hidden_BxCxE, aux_hidden_BxCxE):
    """A chunk's combined logits [B, C, V] float32 from both models' hidden states and (heads, bag logits)."""
    lm_head, aux_head, bag_BxV = shared
    return (lm_hidden_BxCxE @ lm_head).astype(_F32) + _with_bag((aux_hidden_BxCxE @ aux_head).astype(_F32), bag_BxV)


@functools.partial(jax.jit, static_argnums=(0,))
def _keyword_prefill(model: AuxTunedLM, aux_params, aux_cache, keyword_ids, keyword_mask):
    """The auxiliary model run over the keyword segment into its cache."""
    return model.aux.apply({"params": aux_params}, keyword_ids, aux_cache, keyword_mask, method="prefill").cache


def _unit(x, axis=-1):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + 1e-12)


def bag_logits(trained, bag_BxE):
    """[B, V]: sqrt(E) * <gain * bag / |bag|, E[v] / |E[v]|> for every token v (0 for an empty bag)."""
    table = trained["model"]["model"]["embed_tokens"]["embedding"].astype(_F32)  # [V, E]
    direction = _unit(bag_BxE) * trained["bag_scale"] * (bag_BxE.shape[-1] ** 0.5)
    return direction @ _unit(table).T


def keyword_bag(aux_model_params, keyword_ids, keyword_mask):
    """The mean of the keywords' embeddings in the auxiliary model's table: [B, E] float32."""
    table = aux_model_params["model"]["embed_tokens"]["embedding"].astype(_F32)
    m = jnp.asarray(keyword_mask, _F32)[..., None]
    return jnp.sum(table[jnp.asarray(keyword_ids)] * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
