"""What predict segments with: one run as before, an ensemble averaged, mismatches refused."""

import dataclasses
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import assert_one_line_error, run_autocontext

from autocontext_jax import inference
from autocontext_jax.data.nifti import read_scan
from autocontext_jax.data.preprocess import preprocess_scan
from autocontext_jax.data.sampling import downsample_factor
from autocontext_jax.inference.segment import ensemble_pyramid
from autocontext_jax.models import build_pyramid
from autocontext_jax.models.init import init_variables


def _scan(tiny_phantom):
    return sorted((tiny_phantom / "imagesTr").glob("*_0000.nii.gz"))[0]


def _labels(path):
    return np.asarray(nib.load(path).dataobj)


def _labels_the_way_before_ensembles(run, scan_path):
    """The finest labels as segment computed them for one run before ensembles existed."""
    scan = read_scan(scan_path)
    volume, geometry = preprocess_scan(scan, run.plan)
    options = inference.default_options(run.config)
    probs = inference.predict_pyramid(run.model, run.variables, volume, run.plan.pad_value, options)
    finest = run.model.num_levels
    canonical = inference.upsample_to_native(
        probs[-1],
        downsample_factor(finest, finest),
        volume.shape,
        True,
        grid_shape=geometry.canonical_shape,
    )
    return canonical, geometry


@pytest.mark.slow
def test_one_member_is_todays_output_and_two_copies_give_the_same_labels(
    tiny_run, tiny_phantom, tmp_path
):
    scan = _scan(tiny_phantom)
    run = inference.load_run(tiny_run)
    expected, geometry = _labels_the_way_before_ensembles(run, scan)
    segmented = inference.segment(inference.load_model([tiny_run]), read_scan(scan))
    np.testing.assert_array_equal(segmented.finest, expected)
    outputs = {}
    for name, workdirs in (("one", [tiny_run]), ("two", [tiny_run, tiny_run])):
        outputs[name] = tmp_path / f"{name}.nii.gz"
        flags = [f"--workdir={w}" for w in workdirs]
        result = run_autocontext("predict", *flags, f"--input={scan}", f"--output={outputs[name]}")
        assert result.returncode == 0, result.stderr
    assert "An ensemble of 2" in result.stdout
    one, two = _labels(outputs["one"]), _labels(outputs["two"])
    np.testing.assert_array_equal(one, two)
    # The file holds the labels computed the old way, in the scan's own voxel order.
    np.testing.assert_array_equal(
        nib.as_closest_canonical(nib.load(outputs["one"])).get_fdata().astype(np.uint8), expected
    )
    assert geometry.canonical_shape == expected.shape


def test_the_ensemble_averages_the_members_softmax(tiny_run, tiny_phantom):
    run = inference.load_run(tiny_run)
    scaled = dataclasses.replace(
        run,
        variables={
            "params": {
                level: {
                    **layers,
                    "Conv_0": {**layers["Conv_0"], "bias": layers["Conv_0"]["bias"].at[0].add(3.0)},
                }
                for level, layers in run.variables["params"].items()
            },
            "batch_stats": run.variables["batch_stats"],
        },
    )
    volume, _ = preprocess_scan(read_scan(_scan(tiny_phantom)), run.plan)
    options = inference.default_options(run.config)
    model = inference.Model((run, scaled))
    averaged = ensemble_pyramid(model, volume, options)
    each = [
        inference.predict_pyramid(m.model, m.variables, volume, m.plan.pad_value, options)
        for m in (run, scaled)
    ]
    assert not np.allclose(each[0][-1], each[1][-1], atol=1e-3)  # the members differ
    for level, probs in enumerate(averaged):
        np.testing.assert_allclose(probs, (each[0][level] + each[1][level]) / 2, rtol=1e-6)


def test_members_whose_plan_classes_or_label_map_differ_are_refused(
    tiny_run, tiny_phantom, tmp_path
):
    run = inference.load_run(tiny_run)
    other_plan = dataclasses.replace(
        run, plan=dataclasses.replace(run.plan, mean=run.plan.mean + 1)
    )
    with pytest.raises(inference.MemberMismatchError, match="preprocessing plan differs"):
        inference.Model((run, other_plan))
    config = run.config.copy_and_resolve_references()
    config.data.label_map = ((0, 0), (1, 1))
    with pytest.raises(inference.MemberMismatchError, match="label map differs"):
        inference.Model((run, dataclasses.replace(run, config=config)))
    # On the command line: a copy of the run whose plan.json says another mean.
    copy = tmp_path / "other_run"
    shutil.copytree(tiny_run, copy)
    plan = json.loads((copy / "plan.json").read_text())
    plan["plan"]["mean"] += 1
    (copy / "plan.json").write_text(json.dumps(plan))
    output = tmp_path / "seg.nii.gz"
    result = run_autocontext(
        "predict",
        f"--workdir={tiny_run}",
        f"--workdir={copy}",
        f"--input={_scan(tiny_phantom)}",
        f"--output={output}",
    )
    assert_one_line_error(result, f"Cannot ensemble: {copy}: its preprocessing plan differs")
    assert not output.exists()


def test_a_folder_of_runs_is_an_ensemble_of_them(tiny_run, tmp_path):
    for fold in ("fold0", "fold1"):
        shutil.copytree(tiny_run, tmp_path / "runs" / fold)
    model = inference.load_model([tmp_path / "runs"])
    assert [member.workdir.name for member in model.members] == ["fold0", "fold1"]
    assert model.description().startswith("an ensemble of 2: step 2 of ")


def test_members_of_other_poolings_average_over_the_grid_they_share(tiny_run, tiny_phantom):
    run = inference.load_run(tiny_run)
    config = run.config.copy_and_resolve_references()
    config.model.num_poolings = 2  # another padding multiple: larger padded grids
    deeper = build_pyramid(config)
    other = dataclasses.replace(
        run, config=config, model=deeper, variables=init_variables(deeper, 1)
    )
    model = inference.Model((run, other))
    assert model.num_poolings == 2
    scan = read_scan(_scan(tiny_phantom))
    volume, _ = preprocess_scan(scan, run.plan)
    options = inference.TilingOptions(tile_size=16)
    each = [
        inference.predict_pyramid(m.model, m.variables, volume, m.plan.pad_value, options)
        for m in (run, other)
    ]
    assert each[0][-1].shape != each[1][-1].shape
    averaged = ensemble_pyramid(model, volume, options)
    for level, probs in enumerate(averaged):
        x, y, z = probs.shape[:3]
        factor = downsample_factor(level + 1, model.num_levels)
        # The shared grid still covers the whole (unpadded) volume.
        assert all(n * factor >= v for n, v in zip((x, y, z), volume.shape, strict=True))
        expected = (each[0][level][:x, :y, :z] + each[1][level][:x, :y, :z]) / 2
        np.testing.assert_allclose(probs, expected, rtol=1e-6)
    labels = inference.segment(model, scan, options).finest
    assert labels.shape == scan.image.shape
