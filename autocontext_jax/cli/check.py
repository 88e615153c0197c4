"""Check an installation in a minute or two: train, predict and verify geometry, offline.

    autocontext check
    autocontext check --scan ct.nii.gz     # also segment your own scan, check its geometry
    autocontext check --model model.zip    # check an exported model instead of training one

Writes four small phantom cases, trains a tiny pyramid on three for a few steps, loads
the run back as predict does, segments the held-out case and a copy of it stored in
another voxel orientation, and checks that each output has its input's grid and header
and that both copies get the same labels in the scanner's space. One PASS or FAIL line
per step; exit status 1 on the first failure. Nothing is downloaded; everything is
written to a temporary folder (--workdir to keep it). The labels of so short a training
are not meant to be good: this checks the machinery, not the model. With --model (a file
of `autocontext export`), that model is checked in place of the tiny training: its file
read and verified, then the same predictions and geometry checks.
"""

from __future__ import annotations

import pathlib
import tempfile
import time
from collections.abc import Callable, Sequence

import ml_collections
import nibabel as nib
import numpy as np
from absl import flags

from autocontext_jax.cli.common import (
    CommandError,
    fail,
    no_arguments,
    quiet_logging,
    run_command,
)
from autocontext_jax.config.files import SHIPPED_CONFIGS, load_config_file
from autocontext_jax.data.dataset import read_split
from autocontext_jax.inference import Model, default_options, load_model, load_run, predict_file
from autocontext_jax.inference.predict import side_output
from autocontext_jax.phantom import write_phantom_dataset
from autocontext_jax.training.loop import train

FLAGS = flags.FLAGS
NUM_CASES = 4
STEPS = 6
PHANTOM_SHAPE = (48, 40, 32)
PHANTOM_SPACING = (4.0, 4.0, 4.0)
# Input axis 0 becomes axis 1, reversed; axis 1 becomes axis 0: another voxel orientation.
REORIENTATION = np.array([[1, -1], [0, 1], [2, 1]])
# Probabilities are stored as float16: about 1e-3 apart at most for the same values.
PROBABILITY_TOLERANCE = 2e-3


class CheckError(CommandError):
    """A step of the check found something wrong; the message says what."""

    prefix = "Check failed at step"


def define_flags() -> None:
    """Define the command line's flags."""
    flags.DEFINE_string("scan", None, "Also segment this NIfTI scan and check its geometry.")
    flags.DEFINE_string("workdir", None, "Keep everything here (default: a temporary folder).")
    flags.DEFINE_string(
        "model", None, "Check this model file of `autocontext export` instead of training one."
    )


def check_config(data_dir: pathlib.Path, cache_dir: pathlib.Path) -> ml_collections.ConfigDict:
    """configs/default.py shrunk to a few seconds of training on the phantom."""
    path = SHIPPED_CONFIGS / "default.py"
    if not path.is_file():
        raise CheckError(f"{path}: no configs/ folder; install from a clone (pip install -e .)")
    config = load_config_file(path)
    config.data.dir = str(data_dir)
    config.data.cache_dir = str(cache_dir)
    config.data.phantom_cases = 0
    config.data.num_val_cases = 1
    config.data.crop_size = 8
    config.model.width = 2
    config.model.num_poolings = 1
    config.train.steps = STEPS
    config.train.batch_size = 2
    config.train.warmup_steps = 1
    config.train.checkpoint_every = STEPS
    config.train.log_every = STEPS // 2
    config.eval.at_end = False
    return config


def same_header(output: pathlib.Path, source: pathlib.Path) -> None:
    """Raise unless `output` has the shape, affine, qform/sform and voxel size of `source`."""
    scan, seg = nib.load(source), nib.load(output)
    if seg.shape != scan.shape:
        raise CheckError(f"{output}: shape {seg.shape} differs from the scan's {scan.shape}")
    if not np.allclose(seg.affine, scan.affine, atol=1e-4):
        raise CheckError(f"{output}: affine differs from that of {source}")
    for name in ("get_qform", "get_sform"):
        scan_affine, scan_code = getattr(scan.header, name)(coded=True)
        seg_affine, seg_code = getattr(seg.header, name)(coded=True)
        if seg_code != scan_code or (scan_code and not np.allclose(seg_affine, scan_affine)):
            raise CheckError(f"{output}: {name[4:]} differs from that of {source}")
    if not np.allclose(seg.header.get_zooms(), scan.header.get_zooms()):
        raise CheckError(f"{output}: voxel size differs from that of {source}")


def canonical_labels(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """A label map's voxels and affine in RAS+ order, to compare files of any orientation."""
    image = nib.as_closest_canonical(nib.load(path))
    return np.asarray(image.dataobj), image.affine


def canonical_probabilities(output: pathlib.Path) -> np.ndarray:
    """The probabilities written beside `output`, in RAS+ voxel order."""
    saved = np.load(side_output(output, "probabilities", ".npz"))
    ornt = nib.orientations.io_orientation(nib.load(output).affine)
    return nib.orientations.apply_orientation(saved["probabilities"].astype(np.float32), ornt)


def run_steps(workdir: pathlib.Path, scan: pathlib.Path | None, model: Model | None = None) -> None:
    """Every step of the check, printed as it passes; raises CheckError on the first failure.

    With `model` (an exported model, read and verified before the steps), it is checked
    in place of a tiny training.
    """
    start = time.perf_counter()

    def step(name: str, action: Callable[[], str]) -> None:
        began = time.perf_counter()
        try:
            detail = action()
        except Exception as error:  # every failure is a FAIL line, never a traceback
            print(f"FAIL  {name}: {error}", flush=True)
            raise CheckError(name) from error
        print(f"PASS  {name}: {detail} ({time.perf_counter() - began:.1f} s)", flush=True)

    data, run_dir, out = workdir / "phantom", workdir / "run", workdir / "predictions"

    def phantom() -> str:
        write_phantom_dataset(data, NUM_CASES, 0, PHANTOM_SHAPE, PHANTOM_SPACING)
        return f"{NUM_CASES} generated cases in {data}"

    step("phantom", phantom)

    def training() -> str:
        final = train(check_config(data, workdir / "cache"), run_dir)
        if final != STEPS:
            raise CheckError(f"stopped at step {final} of {STEPS}")
        return f"{STEPS} steps of a tiny pyramid, checkpoint in {run_dir / 'checkpoints'}"

    runs = []
    if model is None:
        step("train", training)

        def load() -> str:
            runs.append(load_run(run_dir))
            return f"step {runs[0].step} of {run_dir}, as predict loads it"

        step("load", load)
        held_out_case = read_split(run_dir)["val"][0]
    else:
        runs.append(model)
        print(f"PASS  load: {model.description()}, its digests verified", flush=True)
        held_out_case = sorted(p.name for p in (data / "labelsTr").iterdir())[0]
        held_out_case = held_out_case.removesuffix(".nii.gz")
    trained = runs[0]
    options = default_options(trained.config)
    held_out = data / "imagesTr" / f"{held_out_case}_0000.nii.gz"

    def predict_held_out() -> str:
        predict_file(trained, held_out, out / "held_out.nii.gz", options, save_probabilities=True)
        same_header(out / "held_out.nii.gz", held_out)
        return f"{held_out.name}: labels on the scan's grid, its header kept"

    step("predict", predict_held_out)

    def predict_reoriented() -> str:
        image = nib.load(held_out)
        turned = image.as_reoriented(REORIENTATION)
        source = workdir / "reoriented_0000.nii.gz"
        nib.save(turned, source)
        predict_file(trained, source, out / "reoriented.nii.gz", options, save_probabilities=True)
        same_header(out / "reoriented.nii.gz", source)
        labels, affine = canonical_labels(out / "reoriented.nii.gz")
        reference, reference_affine = canonical_labels(out / "held_out.nii.gz")
        if not np.allclose(affine, reference_affine, atol=1e-4):
            raise CheckError("the two outputs do not lie on one grid in scanner space")
        agree = float(np.mean(labels == reference))
        if agree < 0.999:
            raise CheckError(f"the copies' labels agree on only {100 * agree:.2f} % of voxels")
        # A barely trained model may label everything alike; its probabilities still follow
        # the image, so a flipped or swapped axis shows here.
        difference = float(
            np.max(
                np.abs(
                    canonical_probabilities(out / "reoriented.nii.gz")
                    - canonical_probabilities(out / "held_out.nii.gz")
                )
            )
        )
        if difference > PROBABILITY_TOLERANCE:
            raise CheckError(f"the copies' probabilities differ by up to {difference:.4f}")
        stored, original = ("".join(nib.aff2axcodes(i.affine)) for i in (turned, image))
        return (
            f"a copy stored {stored} instead of {original}: its own header kept; in scanner "
            f"space labels agree on {100 * agree:.2f} % of voxels, probabilities to "
            f"{difference:.1e}"
        )

    step("orientation", predict_reoriented)
    if scan is not None:

        def predict_scan() -> str:
            predict_file(trained, scan, out / "scan.nii.gz", options)
            same_header(out / "scan.nii.gz", scan)
            return f"{scan}: labels in {out / 'scan.nii.gz'}, the scan's grid and header"

        step("your scan", predict_scan)
    print(f"All checks passed in {time.perf_counter() - start:.0f} s.", flush=True)


def main(argv: list[str]) -> None:
    """Run the check in --workdir or a temporary folder; exit 1 on the first failure."""
    no_arguments(argv)
    quiet_logging()
    scan = None if FLAGS.scan is None else pathlib.Path(FLAGS.scan)
    if scan is not None and not scan.is_file():
        fail("--scan", FileNotFoundError(f"{scan}: no such file"))
    # Read before the steps: a damaged or foreign file is one line, not a failed step.
    model = None if FLAGS.model is None else load_model(model_files=[FLAGS.model])
    if FLAGS.workdir is not None:
        run_steps(pathlib.Path(FLAGS.workdir), scan, model)
    else:
        with tempfile.TemporaryDirectory(prefix="autocontext_check_") as folder:
            run_steps(pathlib.Path(folder), scan, model)


def run(argv: Sequence[str] | None = None) -> None:
    """Entry point of the command (`argv` defaults to sys.argv)."""
    run_command(__doc__, define_flags, main, argv, computes=True)
