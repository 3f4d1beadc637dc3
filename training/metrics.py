"""Metrics to `metrics.jsonl` and TensorBoard event files in the workdir, plus a progress bar."""

from __future__ import annotations

import json
import os

import jax
from tqdm import tqdm


class MetricsWriter:
    """Writes on process 0 only: one JSON object per logged step, and TensorBoard scalars."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self._jsonl = self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in metrics.items():
            self._tb.add_scalar(k, float(v), int(step))
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def progress_bar(start: int, total: int, desc: str = "train"):
    return tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, disable=jax.process_index() != 0,
                mininterval=1.0)
