"""Keyword-conditioned generation from an auxiliary-tuning run, streaming tokens to stdout:

  python main.py --config=configs/aux_tuning_generate.py --config.checkpoint=DIR --config.keywords="river,stone"

DIR is an `aux_tuning` workdir: its checkpoint holds the auxiliary model; the frozen LM is read from
where that run found it, and must still be the same (its digest is checked).
"""

from __future__ import annotations

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from aux_tuning import AuxTunedLM, AuxTuningError, keyword_block, keyword_tokens, load_frozen_lm
from common.checkpoints import restore_run_params
from common.tokenizers import load_tokenizer, text_streamer
from jamba_jax import JambaConfig, check_generation_args, generate


def load_run(path: str):
    """(model, variables {"lm", "aux"}, tokenizer, meta) of an aux_tuning workdir's newest checkpoint."""
    meta, _, step = restore_run_params(path, None)
    if meta.get("task") != "aux_tuning":
        raise AuxTuningError(f"{path} (step {step}) is a {meta.get('task')!r} run, not an aux_tuning one")
    record = meta["frozen_inputs"]
    lm_dir = re.sub(r" \(step \d+\)$", "", record["source"])
    _, lm_params, _, digest = load_frozen_lm(lm_dir, meta.get("frozen_lm_quantize", ""))
    if digest != record["digest"]:
        raise AuxTuningError(f"the frozen LM at {lm_dir} is not the one {path} was trained against (digest {digest}, "
                             f"the run recorded {record['digest']})")
    model = AuxTunedLM(JambaConfig.from_dict(meta["lm"]), JambaConfig.from_dict(meta["model"]),
                       tuple(meta["aux"]["feature_layers"]),
                       bool(meta["aux"].get("keyword_bag", True)))  # (runs from before the option had the term)
    abstract = jax.eval_shape(model.init_aux, jax.random.PRNGKey(0))
    _, aux_params, _ = restore_run_params(path, abstract)
    tokenizer = load_tokenizer(meta.get("tokenizer", ""), model.cfg.vocab_size)
    return model, {"lm": lm_params, "aux": aux_params}, tokenizer, meta


def run(config, workdir: str) -> np.ndarray:
    del workdir
    model, variables, tok, meta = load_run(config.checkpoint)
    keywords = [w.strip() for w in config.keywords.split(",") if w.strip()]
    kw = keyword_tokens(tok, keywords)
    if not keywords or not kw:
        raise AuxTuningError(f"config.keywords={config.keywords!r} tokenizes to nothing: give comma-separated words")
    kw_ids, kw_mask = keyword_block([kw], meta["aux"]["max_keyword_tokens"], tok.pad_id)
    prompt = np.asarray([[tok.bos_id] + tok.encode(config.prompt)], np.int32)
    sampling = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k or None)
    check_generation_args(prompt, model.cfg.vocab_size, **sampling)  # before anything is printed
    cache = model.start_cache(variables, kw_ids, kw_mask, prompt.shape[1] + config.max_new_tokens)
    sys.stdout.write(f"[{', '.join(keywords)}] {config.prompt}")
    sys.stdout.flush()
    out = generate(model, variables, jnp.asarray(prompt), **sampling, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                   rng=jax.random.PRNGKey(config.seed), cache=cache, callback=text_streamer(tok))
    sys.stdout.write("\n")
    return out
