"""Diagnostics of the context on a tiny trained run."""

import json

import numpy as np
import pytest
from conftest import make_tiny_config, run_autocontext

from autocontext_jax.cli.train import train_and_evaluate
from autocontext_jax.data import dataset as dataset_lib
from autocontext_jax.data.preprocess import preprocess_case
from autocontext_jax.evaluation import diagnose
from autocontext_jax.evaluation.evaluate import held_out_cases
from autocontext_jax.inference import load_run
from autocontext_jax.inference.tiling import predict_level

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(tiny_phantom, tmp_path_factory):
    """A two-level end-to-end run of 4 steps, evaluated at the end."""
    workdir = tmp_path_factory.mktemp("diagnose") / "run"
    config = make_tiny_config(tiny_phantom)
    train_and_evaluate(config, str(workdir))
    return workdir


class Recorder:
    """predict_level, recording the context and the BatchNorm mode of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, variables, image, coarse_probs, *args, **kwargs):
        self.calls.append((image.shape[:3], coarse_probs, kwargs.get("batch_statistics", False)))
        return predict_level(model, variables, image, coarse_probs, *args, **kwargs)


def test_the_ground_truth_context_reaches_the_finest_level_exactly(trained_run):
    run = load_run(trained_run)
    files = held_out_cases(run)[0]
    recorder = Recorder()
    diagnosis = diagnose.make_diagnosis(run, recorder)
    case = diagnose.load_case(run, files)
    scores = diagnose.diagnose_case(run, diagnosis, case)
    assert set(scores["contexts"]) == set(diagnose.CONTEXTS)

    # The one-hot of the labels on the grid training uses (the cache's own preprocessing),
    # padded as the pyramid pads, averaged over 4x4x4 blocks: the grid of level 1 of 2
    # (the finest level sees the image downsampled by 2, level 1 by 4).
    _, labels, _ = preprocess_case(files, run.plan, run.config.data, run.num_classes)
    multiple = run.model.padding_multiple
    padded = np.pad(labels, [(0, -n % multiple) for n in labels.shape])
    one_hot = np.eye(run.num_classes, dtype=np.float32)[padded]
    x, y, z = (n // 4 for n in padded.shape)
    expected = one_hot.reshape(x, 4, y, 4, z, 4, -1).mean(axis=(1, 3, 5))

    finest_grid = max(shape for shape, _, _ in recorder.calls)
    finest_contexts = [c for shape, c, _ in recorder.calls if shape == finest_grid]
    # real, ground truth, uniform, training mode: four runs of the finest level.
    assert len(finest_contexts) == 4
    matches = [
        c for c in finest_contexts if c.shape == expected.shape and np.array_equal(c, expected)
    ]
    assert len(matches) == 1
    uniform = [c for c in finest_contexts if np.all(c == 1 / run.num_classes)]
    assert len(uniform) == 1
    # Level 1 runs twice, with running and with batch statistics (training mode), and
    # the finest level gets the two outputs, which differ.
    coarse = [(c, batch) for shape, c, batch in recorder.calls if shape != finest_grid]
    assert [(c, batch) for c, batch in coarse] == [(None, False), (None, True)]
    real, training_mode = [c for c in finest_contexts if not any(c is m for m in matches + uniform)]
    assert real.shape == training_mode.shape == expected.shape
    assert not np.array_equal(real, training_mode)


def test_the_real_context_gives_the_evaluations_dice(trained_run):
    run = load_run(trained_run)
    result = diagnose.diagnose_run(run, held_out_cases(run), [])
    evaluated = json.loads((trained_run / "eval_cases.json").read_text())
    for level in ("level_1", "level_2"):
        np.testing.assert_allclose(
            result["levels"]["held_out"][level], evaluated["dice"][level], atol=1e-6
        )
    np.testing.assert_allclose(result["contexts"]["real"], evaluated["dice"]["level_2"], atol=1e-6)


def test_the_command_prints_and_writes_the_tables(trained_run):
    command = ["diagnose", f"--workdir={trained_run}"]
    result = run_autocontext(*command, "--train_cases=2")
    assert result.returncode == 0, result.stderr
    for context in diagnose.CONTEXTS:
        assert f"| {context} |" in result.stdout
    assert "| level 1, training |" in result.stdout and "| level 2, held-out |" in result.stdout
    written = json.loads((trained_run / diagnose.JSON_FILE).read_text())
    train_ids = dataset_lib.read_split(trained_run)["train"][:2]
    assert written["train_cases"] == train_ids
    assert len(written["levels"]["train"]["level_2"]) == 2
    assert (trained_run / diagnose.MARKDOWN_FILE).read_text() in result.stdout

    missing = run_autocontext(*command[:-1], f"--workdir={trained_run}/nope")
    assert missing.returncode != 0
    assert missing.stderr.strip().startswith("Bad workdir: ") and "nope" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
