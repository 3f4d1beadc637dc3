"""The frozen LM of auxiliary tuning: any causal Jamba checkpoint (`jamba_jax.load_checkpoint`), read
with where it came from and a digest of its bytes, which the run records (a resume, or generation
from the run, against other weights is refused)."""

from __future__ import annotations

from aux_tuning.model import AuxTuningError
from jamba_jax import CheckpointError, JambaConfig, load_checkpoint, locate_checkpoint


def load_frozen_lm(path: str, quantize: str = "") -> tuple[JambaConfig, dict, str, str]:
    """(cfg, params, source, digest) of a causal Jamba to freeze; names what is wrong otherwise."""
    try:
        source = locate_checkpoint(path)
    except CheckpointError as e:
        raise AuxTuningError(f"config.frozen_lm: {e}; auxiliary tuning adds logits to a causal Jamba's") from e
    cfg, params = load_checkpoint(source, quantize=quantize or None)
    return cfg, params, source.description, source.digest()
