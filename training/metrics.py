"""Metrics to `metrics.jsonl` and TensorBoard event files in the workdir, plus a progress bar.

A run that resumes from step S (0: a fresh start) first drops what a killed run logged past S:
rows of metrics.jsonl (rewritten atomically) and TensorBoard events (purged from step S + 1), so
every step appears once."""

from __future__ import annotations

import json
import os

import jax
from tqdm import tqdm

from common.files import atomic_write_text


def truncate_jsonl(path: str, last_step: int) -> None:
    """Keeps the rows of a metrics.jsonl whose step is at most `last_step` (and drops a torn last line)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by a kill
    atomic_write_text(path, "".join(kept))


class MetricsWriter:
    """Writes on process 0 only: one JSON object per logged step, and TensorBoard scalars."""

    def __init__(self, workdir: str, start_step: int = 0):
        self.enabled = jax.process_index() == 0
        self._jsonl = self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            truncate_jsonl(path, start_step)
            self._jsonl = open(path, "a")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

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
