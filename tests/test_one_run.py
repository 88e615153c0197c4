"""One trained run, one road from scan to labels: every command sees the run the same way.

The run below is what exposed the seams: a relative `data.dir`, a label-mapped dataset
(ids 11..17, as a TotalSegmentator map has ids beyond the model's classes), a plan that
depends on the training cases (foreground z-score) and resamples (5 mm), and a model
seed that differs from the split seed.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from autocontext_jax import inference
from autocontext_jax.cli.train import train_and_evaluate
from autocontext_jax.config.files import load_config_file
from autocontext_jax.data import dataset as dataset_lib
from autocontext_jax.evaluation import figures, metrics
from autocontext_jax.evaluation.evaluate import (
    evaluate_cases,
    evaluate_workdir,
    held_out_cases,
    load_case,
)
from autocontext_jax.models import build_pyramid, conv
from autocontext_jax.models.init import init_variables

pytest.importorskip("matplotlib")

TESTS = pathlib.Path(__file__).resolve().parent
LABEL_OFFSET = 10
CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
from conftest import make_tiny_config


def get_config():
    config = make_tiny_config("shifted")
    config.seed = 1
    config.data.split_seed = 0
    config.data.normalization = "foreground_zscore"
    config.data.target_spacing = (5.0, 5.0, 5.0)
    config.data.label_map = tuple((k + {offset}, k) for k in range(1, 8))
    config.data.preprocess_workers = 0
    config.train.steps = 2
    return config
"""


def _shifted_copy(source: pathlib.Path, target: pathlib.Path) -> None:
    """The phantom with every structure id moved up by LABEL_OFFSET."""
    shutil.copytree(source, target)
    for path in sorted((target / "labelsTr").glob("*.nii.gz")):
        image = nib.load(path)
        data = np.asarray(image.dataobj).astype(np.uint8)
        data[data > 0] += LABEL_OFFSET
        nib.save(nib.Nifti1Image(data, image.affine, image.header), path)


@pytest.fixture(scope="module")
def run(tiny_phantom, tmp_path_factory):
    """A run trained from `base` with relative paths; the plan the preprocess command made."""
    base = tmp_path_factory.mktemp("base")
    _shifted_copy(tiny_phantom, base / "shifted")
    config_path = base / "tiny.py"
    config_path.write_text(CONFIG_FILE.format(tests=str(TESTS), offset=LABEL_OFFSET))
    command = [sys.executable, "-m", "autocontext_jax", "preprocess", f"--config={config_path}"]
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    done = subprocess.run(command, cwd=base, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    preprocessed_plan = json.loads((base / "shifted_preprocessed" / "plan.json").read_text())
    config = load_config_file(config_path)
    before = os.getcwd()
    os.chdir(base)
    try:
        train_and_evaluate(config, "run")
    finally:
        os.chdir(before)
    return {"base": base, "workdir": base / "run", "preprocessed_plan": preprocessed_plan}


def test_the_preprocess_command_plans_from_the_run_s_own_training_cases(run):
    run_plan = json.loads((run["workdir"] / "plan.json").read_text())["plan"]
    assert run["preprocessed_plan"]["plan"] == run_plan


def test_a_run_evaluates_and_plots_from_any_working_directory(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = evaluate_workdir(run["workdir"])
    assert len(result["case_ids"]) == 1
    assert figures.plot_run(run["workdir"])


def _evaluate(workdir: pathlib.Path) -> dict:
    result = evaluate_workdir(workdir)
    return {name: result[name] for name in ("dice", "hd95", "nsd")}


def test_evaluate_uses_the_run_s_own_plan_whatever_the_shared_cache_holds(run):
    workdir, cache_plan = run["workdir"], run["base"] / "shifted_preprocessed" / "plan.json"
    own_plan = workdir / "plan.json"
    original_cache, original_own = cache_plan.read_text(), own_plan.read_text()
    reference = _evaluate(workdir)

    def coarser(text: str) -> str:
        saved = json.loads(text)
        saved["plan"]["target_spacing"] = [12.0, 12.0, 12.0]
        saved["plan"]["mean"] += 300.0
        return json.dumps(saved)

    try:
        # Another run sharing the cache rewrote its plan: this run's numbers stay.
        cache_plan.write_text(coarser(original_cache))
        assert _evaluate(workdir) == reference
        cache_plan.write_text(original_cache)
        # The run's own plan is what evaluation applies (so the check above can fail).
        own_plan.write_text(coarser(original_own))
        assert _evaluate(workdir) != reference
    finally:
        cache_plan.write_text(original_cache)
        own_plan.write_text(original_own)


def _pixels(path: pathlib.Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_plot_draws_exactly_what_predict_writes(run, tmp_path):
    workdir = run["workdir"]
    case_id = json.loads((workdir / "split.json").read_text())["val"][0]
    plotted = figures.plot_run(workdir)
    config = json.loads((workdir / "config.json").read_text())
    files = {f.case_id: f for f in dataset_lib.list_cases(run["base"] / config["data"]["dir"])}[
        case_id
    ]
    trained = inference.load_run(workdir)
    output = tmp_path / f"{case_id}.nii.gz"
    inference.predict_file(
        trained, files.image, output, inference.default_options(trained.config), save_levels=True
    )
    written = [tmp_path / f"{case_id}_level1.nii.gz", output]
    predictions = [np.asarray(nib.as_closest_canonical(nib.load(p)).dataobj) for p in written]
    label_map = tuple(tuple(pair) for pair in config["data"]["label_map"])
    case = dataset_lib.load_case(files, 8, label_map)
    for plane, path in zip(("axial", "coronal"), plotted, strict=False):
        expected = tmp_path / f"{plane}.png"
        figures.slices_figure(case, predictions, 8, plane).savefig(expected, dpi=120)
        np.testing.assert_array_equal(_pixels(path), _pixels(expected))


def test_the_run_s_convolution_lowering_reaches_inference(tiny_config, monkeypatch):
    seen = []
    original = conv.conv3d_same

    def recording(x, kernel, impl="auto"):
        seen.append(impl)
        return original(x, kernel, impl)

    monkeypatch.setattr(conv, "conv3d_same", recording)
    tiny_config.model.conv_impl = "native"
    tiny_config.model.width = 3  # a model no other test compiled, so it is traced here
    model = build_pyramid(tiny_config)
    variables = init_variables(model, 0)
    seen.clear()
    image = np.zeros((16, 16, 16), np.float32)
    inference.predict_pyramid(model, variables, image, 0.0, inference.TilingOptions(tile_size=8))
    assert seen and set(seen) == {"native"}


def test_evaluate_scores_exactly_what_predict_writes(run, tmp_path):
    trained = inference.load_run(run["workdir"])
    (files,) = held_out_cases(trained)
    result = evaluate_cases(trained, [files])
    output = tmp_path / "seg.nii.gz"
    options = inference.default_options(trained.config)
    inference.predict_file(trained, files.image, output, options, save_levels=True)
    case = load_case(trained, files)
    for level, path in (("level_1", tmp_path / "seg_level1.nii.gz"), ("level_2", output)):
        written = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)
        tolerance = result["nsd_tolerance_mm"]
        scores = metrics.case_metrics(written, case.label, 8, case.geometry.spacing, tolerance)
        for name in metrics.METRIC_NAMES:
            assert scores[name] == result[name][level][0]
