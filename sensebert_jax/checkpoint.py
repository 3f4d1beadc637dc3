"""Reading a SenseBERT pre-training run (a `sensebert_pretrain` training workdir): its setup and
parameters, or its encoder to start a fine-tuning model from."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from common.checkpoints import restore_run_params
from common.errors import UserError
from sensebert_jax.model import SenseBertEncoder, SenseBertForPretraining
from sensebert_jax.setup import SenseBertSetup

PRETRAIN_TASK = "sensebert_pretrain"


class PretrainedMismatchError(UserError):
    """A pre-training run that cannot start the model asked for."""


def _pretraining_meta(workdir: str) -> tuple[dict, int]:
    meta, _, step = restore_run_params(workdir, None)  # the metadata first: what does the run hold?
    if meta.get("task") != PRETRAIN_TASK:
        raise PretrainedMismatchError(f"{workdir}: not a {PRETRAIN_TASK} run (its task is {meta.get('task')!r})")
    return meta, step


def load_pretrained(workdir: str) -> tuple[SenseBertSetup, dict, int]:
    """(setup, SenseBertForPretraining params, step) of a pre-training run's newest intact checkpoint."""
    meta, step = _pretraining_meta(workdir)
    setup = SenseBertSetup.from_meta(meta)
    abstract = jax.eval_shape(lambda: setup.init(SenseBertForPretraining(setup.cfg), jax.random.PRNGKey(0)))
    _, params, step = restore_run_params(workdir, nn.unbox(abstract), step)
    return setup, params, step


def load_pretrained_encoder(workdir: str, setup: SenseBertSetup) -> dict:
    """The encoder parameters (numpy) of a pre-training run, checked to fit `setup`'s model: the same
    config (dropout aside) and the same supersense input."""
    meta, step = _pretraining_meta(workdir)
    mine = setup.meta(PRETRAIN_TASK)["model"]
    diffs = sorted(k for k in mine if meta["model"].get(k) != mine[k] and k != "hidden_dropout_prob")
    if diffs:
        raise PretrainedMismatchError(f"{workdir}: pre-trained with a different model ({', '.join(diffs)} differ)")
    if meta["use_supersenses"] != setup.use_supersenses:
        raise PretrainedMismatchError(f"{workdir} was pre-trained with use_supersenses={meta['use_supersenses']}; "
                                      "set config.sensebert.use_supersenses to match")
    encoder = SenseBertEncoder(setup.cfg)
    ids = jax.numpy.zeros((1, 8), jax.numpy.int32)
    abstract = jax.eval_shape(lambda: encoder.init(jax.random.PRNGKey(0), ids, ids, ids, setup.supersense_matrix))
    _, params, step = restore_run_params(workdir, {"encoder": nn.unbox(abstract["params"])}, step)
    print(f"encoder from {workdir} (step {step})")
    return jax.tree.map(np.asarray, params["encoder"])
