"""What the model configs share: frozen dataclasses with compute / storage dtype fields, built from
plain dicts (an ml_collections `config.model`, a checkpoint's metadata) with unknown fields named."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

DTYPES = ("float32", "bfloat16", "float16")


class ModelConfigBase:
    """Mixin for a frozen dataclass with `dtype` (compute) and `param_dtype` (storage) fields.
    Subclasses set `error` to their ValueError subclass."""

    error: type[ValueError] = ValueError

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weights_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """The config of a plain dict, naming any field that does not exist instead of failing
        with a bare TypeError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names)
        if unknown:
            raise cls.error(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(names)}")
        return cls(**d)

    def check_dtypes(self) -> None:
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                raise self.error(f"{type(self).__name__}.{f}={getattr(self, f)!r}: must be one of {DTYPES}")
