"""Validation during training: Dice per class of a fixed subset of the held-out cases.

The training loop calls the validator every `eval.every` steps with its train state; each
case is segmented by `inference.segment` from the Run that `load_run` would give for a
checkpoint of that state, so the numbers equal `evaluate`'s finest-level Dice of that
checkpoint on the same cases. Training itself never imports this layer: `cli/train.py`
hands the validator to `training.loop.train`.
"""

from __future__ import annotations

import pathlib

import numpy as np

from autocontext_jax.evaluation.evaluate import dice_per_class, held_out_cases, load_case
from autocontext_jax.inference import run_from_state, segment
from autocontext_jax.training.loop import Validate
from autocontext_jax.training.state import TrainState

# Names of the scalars in metrics.jsonl and TensorBoard: PREFIX/CLASS and PREFIX/average.
DICE_PREFIX = "val_dice"
CASES_KEY = "val_cases"


def make_validator(workdir: str | pathlib.Path, num_cases: int) -> Validate:
    """A validator of the first `num_cases` held-out cases of the run in `workdir`.

    It reads the split, config and plan that training wrote into the workdir before its
    first step, and returns ({}, "") when the run holds no case out. It segments in the
    lowering training hands it (`conv_impl`, what training resolved `model.conv_impl` to).
    """

    def validate(state: TrainState, conv_impl: str) -> tuple[dict[str, float], str]:
        run = run_from_state(workdir, state, conv_impl)
        files = held_out_cases(run)[:num_cases]
        if not files:
            return {}, ""
        scores = []
        for case_files in files:
            case = load_case(run, case_files)
            labels = segment(run, case.scan, all_levels=False).finest
            scores.append(dice_per_class(labels, case.label, run.num_classes))
        means = np.mean(np.asarray(scores, np.float64), axis=0)
        scalars = {
            f"{DICE_PREFIX}/{name}": float(value)
            for name, value in zip(run.class_names[1:], means, strict=True)
        }
        scalars[f"{DICE_PREFIX}/average"] = float(means.mean())
        scalars[CASES_KEY] = float(len(files))
        return scalars, validation_line(run.step, scalars)

    return validate


def validation_line(step: int, scalars: dict[str, float]) -> str:
    """One line for the user: the Dice (%) of every class and their average."""
    cases = int(scalars[CASES_KEY])
    dice = ", ".join(
        f"{name.split('/', 1)[1]} {100 * value:.1f}"
        for name, value in scalars.items()
        if name.startswith(f"{DICE_PREFIX}/")
    )
    plural = "s" if cases != 1 else ""
    return f"step {step} validation Dice (%), finest level, {cases} held-out case{plural}: {dice}"
