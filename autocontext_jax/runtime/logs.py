"""Training logs: metrics.jsonl and TensorBoard event files, written by process 0 only.

TensorBoard files come from tensorboardX, which writes the event format with protobuf and
needs neither TensorFlow nor PyTorch (flax.metrics.tensorboard and clu import TensorFlow).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

import jax
import numpy as np
import tensorboardX

from autocontext_jax.data.atomic import write_text_atomically

TENSORBOARD_DIR = "tensorboard"
METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Appends scalars to WORKDIR/metrics.jsonl and to TensorBoard events in WORKDIR/tensorboard.

    On processes other than 0 every method does nothing, so callers need not check.
    """

    def __init__(self, workdir: str | pathlib.Path, start_step: int | None = None):
        """Open the writers (process 0 only), continuing from `start_step` when given.

        A run resumed from the checkpoint of `start_step` replays the steps after it:
        metrics.jsonl is cut back to the lines up to `start_step`, and TensorBoard is told
        to hide the old events after it (`purge_step`), so each step is logged once.
        """
        self.workdir = pathlib.Path(workdir)
        self._tensorboard = None
        if jax.process_index() == 0:
            if start_step is not None:
                truncate_metrics(self.workdir / METRICS_FILE, start_step)
            self._tensorboard = tensorboardX.SummaryWriter(
                str(self.workdir / TENSORBOARD_DIR),
                flush_secs=30,
                purge_step=None if start_step is None else start_step + 1,
            )

    def write_scalars(self, step: int, scalars: Mapping[str, float], to_jsonl: bool = True) -> None:
        """One TensorBoard scalar per name at `step`, and (to_jsonl) one metrics.jsonl line.

        A NaN (the loss of a level not yet trained in a separate run) goes to metrics.jsonl
        only: TensorBoard would draw nothing and tensorboardX warns at every log line.
        """
        if self._tensorboard is None:
            return
        if to_jsonl:
            with (self.workdir / METRICS_FILE).open("a") as stream:
                stream.write(json.dumps({"step": step, **scalars}) + "\n")
        for name, value in scalars.items():
            if not np.isnan(value):
                self._tensorboard.add_scalar(tensorboard_tag(name), value, step)

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """An (H, W, 3) uint8 image, in TensorBoard only."""
        if self._tensorboard is not None:
            self._tensorboard.add_image(name, image, step, dataformats="HWC")

    def close(self) -> None:
        """Flush and close the event file."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def truncate_metrics(path: pathlib.Path, last_step: int) -> None:
    """Keep the lines of a metrics.jsonl up to `last_step` (atomically); drop torn lines."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a run killed mid-write
            continue
        if isinstance(record, dict) and record.get("step", last_step + 1) <= last_step:
            kept.append(line + "\n")
    write_text_atomically(path, "".join(kept))


def tensorboard_tag(name: str) -> str:
    """Group TensorBoard charts: losses under loss/, the rest under train/; `a/b` is kept."""
    if "/" in name:
        return name
    if name.startswith("loss_level_"):
        return f"loss/level_{name.rsplit('_', 1)[1]}"
    if name == "loss":
        return "loss/total"
    return f"train/{name}"
