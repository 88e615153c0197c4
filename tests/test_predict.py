"""Predicting from a trained run: checkpoints in, NIfTI out in the input's own geometry."""

import json
import locale
import logging
import pathlib
import signal
import subprocess
import sys

import flax
import jax
import nibabel as nib
import numpy as np
import pytest

try:
    import SimpleITK as sitk  # noqa: N813
except ImportError:
    sitk = None

from conftest import TOTALSEG_EXAMPLE, assert_one_line_error, run_autocontext

from autocontext_jax import inference
from autocontext_jax.cli import predict as predict_cli
from autocontext_jax.cli.train import train_and_evaluate
from autocontext_jax.data import nifti
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.labels import TOTALSEGMENTATOR_TO_PAPER, parse_label_map
from autocontext_jax.data.plan import Plan
from autocontext_jax.data.scans import read_any_scan
from autocontext_jax.evaluation.folders import evaluate_folders, summary_document
from autocontext_jax.inference import predict as predict_lib
from autocontext_jax.models import build_pyramid
from autocontext_jax.models.init import init_variables

# TotalSegmentator "total" ids of the paper's seven structures (see the data's README).
TOTALSEG_TO_PAPER = dict(TOTALSEGMENTATOR_TO_PAPER)
MARKER_HU = 800.0


def _small_config():
    from conftest import make_tiny_config

    config = make_tiny_config()
    config.model.width = 4
    config.model.num_poolings = 2
    return config


@pytest.fixture(scope="module")
def trained_run(tiny_phantom, tmp_path_factory):
    """A run of the phantom config trained for 2 steps (width 4): a real checkpoint."""
    config = _small_config()
    config.data.dir = str(tiny_phantom)
    config.train.steps = 2
    config.eval.at_end = False
    workdir = tmp_path_factory.mktemp("run")
    train_and_evaluate(config, str(workdir))
    return workdir


@pytest.fixture(scope="module")
def threshold_predictor():
    """A pyramid whose every level marks voxels brighter than ~240 HU as class 1.

    The input channel runs unchanged through the first two and last two conv blocks (the
    skip at full resolution); every other weight is zero; the final conv computes
    logit_0 = 1 - x and logit_1 = x - 1 on the normalised intensity x (others -10), so
    the decision boundary falls half-way between tissue and marker.
    """
    config = _small_config()
    model = build_pyramid(config)
    variables = init_variables(model, 0)
    flat = flax.traverse_util.flatten_dict(jax.device_get(variables["params"]))
    flat = {
        k: np.zeros_like(v) if k[-1] in ("kernel", "bias") and "BatchNorm_0" not in k else v
        for k, v in flat.items()
    }
    last = 4 * config.model.num_poolings + 1
    for level in ("level_1", "level_2"):
        for block in (0, 1, last - 1, last):
            flat[(level, f"ConvBlock_{block}", "Conv_0", "kernel")][1, 1, 1, 0, 0] = 1.0
        flat[(level, "Conv_0", "kernel")][..., 0, :2] = [-1.0, 1.0]
        flat[(level, "Conv_0", "bias")][:] = [1.0, -1.0] + [-10.0] * (config.model.num_classes - 2)
    params = flax.traverse_util.unflatten_dict(flat)
    # An isotropic 1.5 mm grid: every test scan is resampled on the way in and back out.
    plan = Plan(
        target_spacing=(1.5, 1.5, 1.5),
        clip=tuple(config.data.intensity_clip),
        mean=config.data.intensity_mean,
        std=config.data.intensity_std,
        pad_value_hu=config.data.pad_value_hu,
    )
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    return inference.Run(pathlib.Path("."), config, model, variables, 0, plan)


def _rotation_z(degrees):
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


AFFINES = {
    "RAS": np.diag([2.0, 1.5, 3.0]),
    "LPS": np.diag([-2.0, -1.5, 3.0]),
    # Rotated 30 degrees about z and axes permuted: the closest canonical is not the identity.
    "oblique": _rotation_z(30) @ np.array([[0, 0, 2.0], [1.5, 0, 0], [0, -3.0, 0]]),
}


def _write_scan(path, orientation):
    """A scan of soft tissue with one bright off-centre box; returns the box's voxel mask."""
    shape = (33, 40, 19)
    data = np.full(shape, 20, np.int16)
    marker = np.zeros(shape, bool)
    marker[4:14, 22:28, 3:11] = True
    data[marker] = MARKER_HU
    affine = np.eye(4)
    affine[:3, :3] = AFFINES[orientation]
    affine[:3, 3] = [-40.0, 25.0, 100.0]
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=2)
    nib.save(image, path)
    return marker


def _world_centroid(mask, affine):
    return nib.affines.apply_affine(affine, np.argwhere(mask).mean(axis=0))


@pytest.mark.slow
@pytest.mark.parametrize("orientation", list(AFFINES))
def test_output_overlays_the_input_whatever_its_orientation(
    threshold_predictor, tmp_path, orientation
):
    source = tmp_path / "scan.nii.gz"
    marker = _write_scan(source, orientation)
    output = tmp_path / "out" / "seg.nii.gz"
    options = inference.TilingOptions(tile_size=16)
    inference.predict_file(threshold_predictor, source, output, options)

    scan, seg = nib.load(source), nib.load(output)
    assert seg.shape == scan.shape and seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.affine, scan.affine, atol=1e-5)
    for coded in ("get_qform", "get_sform"):
        scan_affine, scan_code = getattr(scan.header, coded)(coded=True)
        seg_affine, seg_code = getattr(seg.header, coded)(coded=True)
        assert seg_code == scan_code
        np.testing.assert_allclose(seg_affine, scan_affine, atol=1e-5)
    np.testing.assert_allclose(seg.header.get_zooms(), scan.header.get_zooms())

    found = np.asarray(seg.dataobj) == 1
    dice = 2 * np.sum(found & marker) / (found.sum() + marker.sum())
    assert dice > 0.8
    shift = _world_centroid(found, seg.affine) - _world_centroid(marker, scan.affine)
    assert np.linalg.norm(shift) < 1.5  # mm; voxels are 1.5 to 3 mm


@pytest.mark.slow
def test_a_folder_gives_one_output_per_case_with_levels_and_probabilities(
    threshold_predictor, tmp_path
):
    inputs = tmp_path / "scans"
    inputs.mkdir()
    for orientation in ("RAS", "LPS"):
        _write_scan(inputs / f"case_{orientation}.nii.gz", orientation)
    (inputs / "notes.txt").write_text("not a scan")
    options = inference.TilingOptions(tile_size=16, weighting="constant")
    results = list(
        inference.predict_paths(
            threshold_predictor,
            inputs,
            tmp_path / "segs",
            options,
            save_levels=True,
            save_probabilities=True,
        )
    )
    assert [r.case for r in results] == ["case_LPS", "case_RAS"]
    for orientation in ("RAS", "LPS"):
        scan = nib.load(inputs / f"case_{orientation}.nii.gz")
        level1 = nib.load(tmp_path / "segs" / f"case_{orientation}_level1.nii.gz")
        assert level1.shape == scan.shape
        saved = np.load(tmp_path / "segs" / f"case_{orientation}_probabilities.npz")
        probabilities = saved["probabilities"]
        assert probabilities.shape == (*scan.shape, 8) and probabilities.dtype == np.float16
        np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-2)
        seg = np.asarray(nib.load(tmp_path / "segs" / f"case_{orientation}.nii.gz").dataobj)
        # Labels are resampled as one-hot maps, probabilities as soft ones: both back from
        # the 1.5 mm grid, they may differ only in a few boundary voxels.
        agree = np.mean((np.argmax(probabilities, axis=-1) == 1) == (seg == 1))
        assert agree > 0.99


def test_restores_the_latest_or_a_chosen_step_of_a_trained_run(trained_run):
    run = inference.load_run(trained_run)
    assert run.step == 2
    assert set(run.variables) == {"params", "batch_stats"}
    expected = jax.eval_shape(lambda: init_variables(run.model, 0))
    assert jax.tree.structure(run.variables) == jax.tree.structure(expected)
    with pytest.raises(inference.CheckpointError, match=r"no checkpoint of step 7 \(have \[2\]\)"):
        inference.load_run(trained_run, step=7)


def test_refuses_a_checkpoint_that_does_not_match_the_saved_config(trained_run, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "checkpoints").symlink_to(trained_run / "checkpoints")
    # A run reads its own plan.json (there is no fallback to a dataset cache's plan).
    (broken / "plan.json").symlink_to(trained_run / "plan.json")
    config = json.loads((trained_run / "config.json").read_text())
    config["model"]["width"] = 8
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(inference.CheckpointError, match="does not match the model"):
        inference.load_run(broken)
    with pytest.raises(inference.CheckpointError, match="config.json: no config.json"):
        inference.load_run(tmp_path / "nowhere")


def test_bad_inputs_and_outputs_get_clear_errors(threshold_predictor, tmp_path):
    options = inference.TilingOptions(tile_size=16)
    text = tmp_path / "scan.nii.gz"
    text.write_text("hello")
    with pytest.raises(DatasetError, match="scan.nii.gz: cannot read as NIfTI"):
        inference.predict_file(threshold_predictor, text, tmp_path / "a.nii.gz", options)
    four_d = tmp_path / "dwi.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), four_d)
    with pytest.raises(DatasetError, match=r"dwi.nii: expected a 3D volume"):
        inference.predict_file(threshold_predictor, four_d, tmp_path / "a.nii.gz", options)
    source = tmp_path / "ok.nii.gz"
    _write_scan(source, "RAS")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DatasetError, match="cannot write there"):
        inference.predict_file(threshold_predictor, source, blocker / "seg.nii.gz", options)
    with pytest.raises(DatasetError, match=r"must end in \.nii or \.nii\.gz"):
        inference.predict_file(threshold_predictor, source, tmp_path / "seg.png", options)


def test_a_failed_write_leaves_an_existing_output_whole(tmp_path, monkeypatch):
    output = tmp_path / "seg.nii.gz"
    reference = nifti.scan_from_image(
        nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), np.eye(4))
    ).geometry
    nifti.write_label_map(np.ones((3, 3, 3), np.uint8), reference, output)
    before = output.read_bytes()

    def failing_save(image, path):
        pathlib.Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nifti.nib, "save", failing_save)
    with pytest.raises(DatasetError, match="disk full"):
        nifti.write_label_map(np.zeros((3, 3, 3), np.uint8), reference, output)
    assert output.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]


@pytest.mark.slow
@pytest.mark.skipif(
    not TOTALSEG_EXAMPLE.is_dir(), reason=f"the real example case is not at {TOTALSEG_EXAMPLE}"
)
def test_command_line_segments_the_real_case_and_prints_dice(trained_run, tmp_path):
    labels = nib.load(TOTALSEG_EXAMPLE / "labels_totalsegmentator.nii.gz")
    ids = np.asarray(labels.dataobj)
    paper = np.zeros(ids.shape, np.uint8)
    for source_id, paper_id in TOTALSEG_TO_PAPER.items():
        paper[ids == source_id] = paper_id
    label_path = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(paper, labels.affine, labels.header), label_path)
    output = tmp_path / "seg.nii.gz"
    command = [
        sys.executable, "-m", "autocontext_jax", "predict",
        "--workdir", str(trained_run),
        "--input", str(TOTALSEG_EXAMPLE / "ct.nii.gz"),
        "--output", str(output),
        "--labels", str(label_path),
        "--tile_size", "16",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "| Dice (%) | artery | portal_vein | liver |" in result.stdout
    scan, seg = nib.load(TOTALSEG_EXAMPLE / "ct.nii.gz"), nib.load(output)
    assert seg.shape == scan.shape and np.allclose(seg.affine, scan.affine)
    values = np.asarray(seg.dataobj)
    assert values.dtype == np.uint8 and values.max() < 8


@pytest.mark.slow
def test_command_line_names_a_missing_checkpoint(tmp_path):
    _write_scan(tmp_path / "scan.nii.gz", "RAS")
    command = [
        sys.executable, "-m", "autocontext_jax", "predict",
        "--workdir", str(tmp_path),
        "--input", str(tmp_path / "scan.nii.gz"),
        "--output", str(tmp_path / "seg.nii.gz"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"Bad workdir: {tmp_path / 'config.json'}: no config.json" in result.stderr


def _nnunet_folder(tiny_phantom, root, cases=2, label_ids=None):
    """imagesTs/CASE_0000.nii.gz and labelsTs/CASE.nii.gz of the first phantom cases."""
    images, labels = root / "imagesTs", root / "labelsTs"
    images.mkdir(parents=True)
    labels.mkdir()
    for image in sorted((tiny_phantom / "imagesTr").glob("*_0000.nii.gz"))[:cases]:
        case = image.name.removesuffix("_0000.nii.gz")
        (images / image.name).write_bytes(image.read_bytes())
        label = nib.load(tiny_phantom / "labelsTr" / f"{case}.nii.gz")
        ids = np.asarray(label.dataobj).astype(np.uint8)
        if label_ids is not None:
            ids = np.asarray(label_ids, np.uint8)[ids]
        nib.save(nib.Nifti1Image(ids, label.affine, label.header), labels / f"{case}.nii.gz")
    return images, labels


def test_folders_go_the_nnunet_way_and_continue_skips_what_is_done(
    threshold_predictor, tiny_phantom, tmp_path
):
    images, labels = _nnunet_folder(tiny_phantom, tmp_path)
    options = inference.TilingOptions(tile_size=16)
    done = list(inference.predict_paths(threshold_predictor, images, tmp_path / "segs", options))
    assert [r.case for r in done] == ["phantom_000", "phantom_001"]
    assert sorted(p.name for p in (tmp_path / "segs").iterdir()) == [
        "phantom_000.nii.gz",
        "phantom_001.nii.gz",
    ]
    jobs = predict_lib.list_inputs(images, tmp_path / "segs")
    found = predict_lib.reference_files(jobs, labels)
    assert [found[job.input].name for job in jobs] == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    again = inference.predict_paths(
        threshold_predictor, images, tmp_path / "segs", options, skip_done=True
    )
    assert list(again) == []
    # An output older than the checkpoint is predicted again.
    assert not predict_lib.predicted_after(jobs[0], jobs[0].output.stat().st_mtime + 1)


def test_predict_never_writes_over_an_input(threshold_predictor, tiny_phantom, tmp_path):
    images, labels = _nnunet_folder(tiny_phantom, tmp_path)
    before = {p: p.read_bytes() for p in [*images.iterdir(), *labels.iterdir()]}
    options = inference.TilingOptions(tile_size=16)
    scan = images / "phantom_000_0000.nii.gz"
    link = tmp_path / "link.nii.gz"
    link.symlink_to(scan)
    plain = tmp_path / "plain.nii.gz"
    plain.write_bytes(scan.read_bytes())
    refused = [
        (images, images, "is the input folder"),
        (images, images / ".." / "imagesTs", "is the input folder"),
        (scan, scan, "would write over the input"),
        (plain, tmp_path / "nowhere" / ".." / "plain.nii.gz", "would write over the input"),
        (scan, link, "would write over the input"),
    ]
    for source, output, message in refused:
        with pytest.raises(DatasetError, match=message):
            list(inference.predict_paths(threshold_predictor, source, output, options))
    jobs = predict_lib.list_inputs(images, labels)
    with pytest.raises(DatasetError, match="would write over the input .*labelsTs"):
        predict_lib.check_outputs(jobs, 2, protected=list(labels.iterdir()))
    assert {p: p.read_bytes() for p in [*images.iterdir(), *labels.iterdir()]} == before
    assert scan.read_bytes() == plain.read_bytes()


def test_a_folder_of_labels_against_itself_scores_perfectly(tiny_phantom, tmp_path):
    _, labels = _nnunet_folder(tiny_phantom, tmp_path)
    result = evaluate_folders(labels, labels, num_classes=8)
    assert result["case_ids"] == ["phantom_000", "phantom_001"]
    np.testing.assert_allclose(result["dice"]["final_level"], 1.0)
    np.testing.assert_allclose(result["hd95"]["final_level"], 0.0)
    document = summary_document(result)
    assert document["mean"]["nsd"]["Avg."] == 1.0
    with pytest.raises(DatasetError, match="no prediction has a reference"):
        evaluate_folders(labels, tmp_path / "imagesTs", num_classes=8)


def test_label_maps_from_a_preset_or_pairs():
    assert parse_label_map("totalsegmentator", 8) == TOTALSEGMENTATOR_TO_PAPER
    assert parse_label_map(" 52:1, 5:3 ", 8) == ((52, 1), (5, 3))
    for text, message in [
        ("52-1", "expected ID:CLASS pairs"),
        ("52:9", r"classes \[9\] >= the model's 8"),
        ("5:1,5:2", "mapped twice"),
        ("", "no ID:CLASS pair"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_label_map(text, 8)


@pytest.mark.slow
def test_command_line_scores_an_nnunet_folder_and_continues(trained_run, tiny_phantom, tmp_path):
    images, labels = _nnunet_folder(tiny_phantom, tmp_path)
    output = tmp_path / "segs"
    command = [
        "predict",
        "--workdir", str(trained_run), "--input", str(images), "--output", str(output),
        "--tile_size", "16",
    ]  # fmt: skip
    result = run_autocontext(*command, "--labels", str(labels))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in output.iterdir()) == [
        "phantom_000.nii.gz",
        "phantom_001.nii.gz",
        "summary.json",
    ]
    assert "phantom_000: " in result.stdout and "mean Dice" in result.stdout
    summary = json.loads((output / "summary.json").read_text())
    assert sorted(summary["cases"]) == ["phantom_000", "phantom_001"]
    assert set(summary["mean"]) == {"dice", "hd95", "nsd"}
    assert list(summary["cases"]["phantom_000"]["hd95"]) == summary["classes"]
    dice = [list(summary["cases"][c]["dice"].values()) for c in sorted(summary["cases"])]
    np.testing.assert_allclose(list(summary["mean"]["dice"].values())[:-1], np.mean(dice, 0))
    written = {p.name: p.stat().st_mtime_ns for p in output.glob("*.nii.gz")}

    # The folder evaluation (no run) scores the written files alike.
    evaluate = [
        "evaluate", "--predictions", str(output),
        "--labels", str(labels), "--summary", str(tmp_path / "evaluated.json"),
    ]  # fmt: skip
    result = run_autocontext(*evaluate)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "evaluated.json").read_text()) == summary

    # The same references with TotalSegmentator's ids, read through the preset, on a rerun
    # that predicts nothing: the same scores.
    to_totalseg = {paper: source for source, paper in TOTALSEGMENTATOR_TO_PAPER}
    paper_to_totalseg = [0] + [to_totalseg[paper] for paper in range(1, 8)]
    _, totalseg_labels = _nnunet_folder(tiny_phantom, tmp_path / "ts", label_ids=paper_to_totalseg)
    rerun = [*command, "--labels", str(totalseg_labels), "--label_map=totalsegmentator"]
    result = run_autocontext(*rerun, "--continue")
    assert result.returncode == 0, result.stderr
    assert "2 of 2 cases predicted after step" in result.stdout
    assert "tiles in" not in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in output.glob("*.nii.gz")} == written
    assert json.loads((output / "summary.json").read_text()) == summary


def _predict_warnings(caplog):
    # Other libraries may warn meanwhile (JAX, Orbax); only predict's own records count.
    return [r for r in caplog.records if r.name == "autocontext_jax.inference.predict"]


def test_an_input_that_does_not_look_like_ct_is_named_in_a_warning(
    threshold_predictor, tiny_phantom, tmp_path, caplog
):
    images, labels = _nnunet_folder(tiny_phantom, tmp_path, cases=1)
    options = inference.TilingOptions(tile_size=16)
    with caplog.at_level(logging.WARNING, logger="autocontext_jax.inference.predict"):
        scan = next(images.iterdir())
        inference.predict_file(threshold_predictor, scan, tmp_path / "a.nii.gz", options)
        assert _predict_warnings(caplog) == []
        label_file = next(labels.iterdir())
        inference.predict_file(threshold_predictor, label_file, tmp_path / "b.nii.gz", options)
    [record] = _predict_warnings(caplog)
    assert str(label_file) in record.getMessage() and "a label map" in record.getMessage()


def test_an_input_without_a_qform_gives_an_output_without_one(tmp_path):
    # As nibabel's as_reoriented writes a scan: sform (code 2) only, qform code 0.
    affine = np.array([[0, 4.0, 0, -83], [4.0, 0, 0, -78], [0, 0, 4.0, -86], [0, 0, 0, 1]])
    image = nib.Nifti1Image(np.zeros((5, 6, 7), np.int16), affine)
    image.header.set_qform(None, code=0)
    image.header.set_sform(affine, code=2)
    nib.save(image, tmp_path / "scan.nii.gz")
    scan = nifti.read_scan(tmp_path / "scan.nii.gz")
    nifti.write_label_map(
        np.zeros(scan.image.shape, np.uint8), scan.geometry, tmp_path / "seg.nii.gz"
    )
    seg = nib.load(tmp_path / "seg.nii.gz")
    assert seg.header.get_qform(coded=True)[1] == 0
    sform, code = seg.header.get_sform(coded=True)
    assert code == 2 and np.allclose(sform, affine)
    np.testing.assert_allclose(seg.affine, affine)


def _dicom_series(folder):
    """A CT-like series written slice by slice as DICOM, oblique and anisotropic; its image."""
    # SimpleITK's DICOM writer (GDCM) sets the process locale to C, which would make every
    # later subprocess of the suite decode its output as ASCII: put it back.
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_dicom_series(folder)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_series(folder):
    data = np.full((19, 40, 33), 20, np.int16)  # ITK array order: (z, y, x)
    data[3:11, 22:28, 4:14] = MARKER_HU
    image = sitk.GetImageFromArray(data)
    image.SetSpacing((0.9, 1.3, 2.5))
    image.SetOrigin((-40.0, 25.0, 100.0))
    rotation = _rotation_z(20)
    image.SetDirection(tuple(rotation.ravel()))
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    orientation = "\\".join(str(v) for v in (*direction[0::3], *direction[1::3]))
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        plane.SetMetaData("0008|0060", "CT")
        plane.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.1")
        plane.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.2")
        plane.SetMetaData("0020|0052", "1.2.826.0.1.3680043.2.1125.1.3")  # frame of reference
        plane.SetMetaData("0020|0037", orientation)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        plane.SetMetaData("0020|0032", "\\".join(str(v) for v in position))
        plane.SetMetaData("0020|0013", str(k + 1))
        plane.SetMetaData("0018|0050", str(image.GetSpacing()[2]))
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(plane)
    return image


@pytest.mark.skipif(sitk is None, reason="needs SimpleITK (pip install -e .[io])")
def test_a_dicom_series_gives_a_nifti_on_the_series_grid_as_itk_reads_both(
    threshold_predictor, tmp_path
):
    written = _dicom_series(tmp_path / "series")
    options = inference.TilingOptions(tile_size=16)
    [done] = inference.predict_paths(
        threshold_predictor, tmp_path / "series", tmp_path / "out", options
    )
    assert done.output == tmp_path / "out" / "series.nii.gz"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    series, output = reader.Execute(), sitk.ReadImage(str(done.output))
    assert output.GetSize() == series.GetSize() == written.GetSize()
    np.testing.assert_allclose(output.GetOrigin(), series.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(output.GetSpacing(), series.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(output.GetDirection(), series.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(series.GetDirection(), written.GetDirection(), atol=1e-5)
    found = sitk.GetArrayFromImage(output) == 1
    marker = sitk.GetArrayFromImage(series) == MARKER_HU
    assert 2 * np.sum(found & marker) / (found.sum() + marker.sum()) > 0.8
    # NRRD and MetaImage copies read onto the same grid.
    reference = read_any_scan(tmp_path / "series").geometry.original_affine
    for name in ("scan.nrrd", "scan.mha"):
        sitk.WriteImage(series, str(tmp_path / name))
        scan = read_any_scan(tmp_path / name)
        np.testing.assert_allclose(scan.geometry.original_affine, reference, atol=1e-5)
    with pytest.raises(DatasetError, match="is the input folder"):
        list(
            inference.predict_paths(
                threshold_predictor, tmp_path / "series", tmp_path / "series", options
            )
        )


def _interrupting(monkeypatch, times):
    """predict_file, patched to receive `times` Ctrl-C while it segments the first case."""
    real = predict_lib.predict_file
    calls = []

    def interrupted(*args, **kwargs):
        if not calls:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_lib, "predict_file", interrupted)


@pytest.mark.slow
def test_ctrl_c_stops_after_the_case_in_progress_and_says_how_to_continue(
    trained_run, tiny_phantom, tmp_path, monkeypatch
):
    images, _ = _nnunet_folder(tiny_phantom, tmp_path, cases=3)
    output = tmp_path / "segs"
    command = ["predict", f"--workdir={trained_run}", f"--input={images}", f"--output={output}"]
    with monkeypatch.context() as patch:
        _interrupting(patch, times=2)  # the second Ctrl-C drops the case in progress
        result = run_autocontext(*command)
    assert result.returncode == 130
    assert_one_line_error(result, "Stopped on SIGINT, the case in progress dropped: 0 of 3")
    assert not output.exists() or not any(output.iterdir())
    with monkeypatch.context() as patch:
        _interrupting(patch, times=1)
        result = run_autocontext(*command)
    assert result.returncode == 130
    assert_one_line_error(
        result, "Stopped on SIGINT, after the case in progress: 1 of 3 cases finished "
        "(phantom_000); 2 left. Continue with: "
    )  # fmt: skip
    [stopped] = [line for line in result.stderr.splitlines() if line.startswith("Stopped")]
    assert stopped.endswith("--continue")
    assert sorted(p.name for p in output.iterdir()) == ["phantom_000.nii.gz"]
    result = run_autocontext(*command, "--continue")
    assert result.returncode == 0, result.stderr
    assert "--continue: 1 of 3 cases" in result.stdout
    assert sorted(p.name for p in output.iterdir()) == [f"phantom_00{k}.nii.gz" for k in range(3)]


@pytest.mark.slow
@pytest.mark.skipif(sitk is None, reason="needs SimpleITK (pip install -e .[io])")
def test_a_dicom_series_summary_is_named_after_its_output(trained_run, tmp_path):
    series = _dicom_series(tmp_path / "series")
    reference = sitk.Image(series.GetSize(), sitk.sitkUInt8)
    reference.CopyInformation(series)
    sitk.WriteImage(reference, str(tmp_path / "reference.nii.gz"))
    output = tmp_path / "out"
    result = run_autocontext(
        "predict", f"--workdir={trained_run}", f"--input={tmp_path / 'series'}",
        f"--output={output}", f"--labels={tmp_path / 'reference.nii.gz'}", "--tile_size=16",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in output.iterdir()) == ["series.nii.gz", "series_summary.json"]


@pytest.mark.slow
def test_captured_standard_error_has_plain_warnings_and_no_bar_redraws(
    trained_run, tiny_phantom, tmp_path
):
    images, labels = _nnunet_folder(tiny_phantom, tmp_path, cases=2)
    # A label map given as a scan: segmented all the same, with a warning naming it.
    label_file = sorted(labels.iterdir())[0]
    (images / "label_0000.nii.gz").write_bytes(label_file.read_bytes())
    command = [
        sys.executable, "-m", "autocontext_jax", "predict", "--workdir", str(trained_run),
        "--input", str(images), "--output", str(tmp_path / "segs"), "--tile_size", "16",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr, repr(result.stderr)
    [warning] = result.stderr.splitlines()
    assert warning.startswith("Warning: ") and "label_0000.nii.gz" in warning, warning
    assert "a label map" in warning


@pytest.mark.slow
def test_predict_labels_warns_of_cases_without_a_reference_and_strict_refuses(
    trained_run, tiny_phantom, tmp_path
):
    images, labels = _nnunet_folder(tiny_phantom, tmp_path, cases=2)
    (labels / "phantom_001.nii.gz").unlink()
    output = tmp_path / "segs"
    command = [
        "predict", f"--workdir={trained_run}", f"--input={images}", f"--output={output}",
        f"--labels={labels}", "--tile_size=16",
    ]  # fmt: skip
    result = run_autocontext(*command, "--strict")
    assert_one_line_error(
        result, "1 predicted cases have no reference, not scored: ['phantom_001']"
    )
    assert not output.exists()
    result = run_autocontext(*command, "--classes=liver,spleen")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "Warning: 1 predicted cases have no reference, not scored: ['phantom_001']"
    ]
    summary = json.loads((output / "summary.json").read_text())
    assert list(summary["cases"]) == ["phantom_000"]
    assert summary["not_labelled"] == [
        "artery", "portal_vein", "stomach", "gallbladder", "pancreas"
    ]  # fmt: skip
    assert sorted(p.name for p in output.glob("*.nii.gz")) == [
        "phantom_000.nii.gz",
        "phantom_001.nii.gz",
    ]


def test_ctrl_c_while_the_run_loads_is_one_line_and_130(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict_cli, "load_model", interrupted)
    scan = tmp_path / "scan.nii.gz"
    _write_scan(scan, "RAS")
    result = run_autocontext(
        "predict", f"--workdir={tmp_path}", f"--input={scan}", f"--output={tmp_path / 's.nii.gz'}"
    )
    assert result.returncode == 130
    assert_one_line_error(result, "Stopped on SIGINT before any case was predicted")
