"""A trained model in one file: export, then predict, evaluate and check with it as a workdir."""

import json
import pathlib
import zipfile

import jax
import nibabel as nib
import numpy as np
import pytest
from conftest import assert_one_line_error, make_tiny_config, run_autocontext

from autocontext_jax import inference
from autocontext_jax.data.dataset import list_cases
from autocontext_jax.evaluation.evaluate import evaluate_cases
from autocontext_jax.inference import export as export_lib
from autocontext_jax.training.loop import train


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> pathlib.Path:
    """The tiny run exported as model.zip by the command."""
    output = tmp_path_factory.mktemp("export") / "model.zip"
    result = run_autocontext("export", f"--workdir={tiny_run}", f"--output={output}")
    assert result.returncode == 0, result.stderr
    assert "Wrote" in result.stdout and output.is_file()
    return output


def _scan(tiny_phantom) -> pathlib.Path:
    return sorted((tiny_phantom / "imagesTr").glob("*_0000.nii.gz"))[0]


def _labels(path: pathlib.Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_the_file_holds_only_what_inference_needs_with_digests(exported, tiny_run):
    with zipfile.ZipFile(exported) as archive:
        names = sorted(archive.namelist())
        manifest = json.loads(archive.read("manifest.json"))
        arrays = np.load(archive.open("member_0/variables.npz"), allow_pickle=False)
        keys = list(arrays.files)
    assert names == [
        "manifest.json",
        "member_0/config.json",
        "member_0/environment.jsonl",
        "member_0/labels.json",
        "member_0/plan.json",
        "member_0/variables.npz",
    ]
    assert manifest["members"] == [{"name": "member_0", "workdir": str(tiny_run), "step": 2}]
    assert set(manifest["sha256"]) == set(names) - {"manifest.json"}
    assert any(k.startswith("params/") for k in keys)
    assert any(k.startswith("batch_stats/") for k in keys)
    # The exported variables are the evaluated ones, as load_run restores them.
    run = inference.load_run(tiny_run)
    [member] = inference.read_model_file(exported)
    for a, b in zip(
        jax_leaves(run.variables), jax_leaves(member.variables), strict=True
    ):  # bit for bit
        np.testing.assert_array_equal(a, b)
    assert member.plan == run.plan and member.class_names == run.class_names


def jax_leaves(tree):
    """The leaves of a pytree as numpy arrays."""
    return [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(tree))]


@pytest.mark.slow
def test_predict_with_the_file_gives_the_workdirs_labels_bit_for_bit(
    exported, tiny_run, tiny_phantom, tmp_path
):
    scan = _scan(tiny_phantom)
    outputs = {}
    for name, source in (("workdir", tiny_run), ("model", exported)):
        outputs[name] = tmp_path / f"{name}.nii.gz"
        result = run_autocontext(
            "predict", f"--{name}={source}", f"--input={scan}", f"--output={outputs[name]}"
        )
        assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(_labels(outputs["workdir"]), _labels(outputs["model"]))


def _flipped(source: pathlib.Path, target: pathlib.Path, offset: int) -> pathlib.Path:
    data = bytearray(source.read_bytes())
    data[offset] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def _data_offset(path: pathlib.Path, name: str) -> int:
    """Where the stored bytes of `name` start in the zip."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    header = path.read_bytes()[info.header_offset : info.header_offset + 30]
    name_length = int.from_bytes(header[26:28], "little")
    extra_length = int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_length + extra_length


def test_a_truncated_or_altered_file_is_one_line_naming_it(exported, tiny_phantom, tmp_path):
    scan = _scan(tiny_phantom)
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(exported.read_bytes()[: exported.stat().st_size // 2])
    variables = _data_offset(exported, "member_0/variables.npz")
    manifest = _data_offset(exported, "manifest.json")
    damaged = [
        truncated,
        _flipped(exported, tmp_path / "flipped_weights.zip", variables + 200),
        _flipped(exported, tmp_path / "flipped_manifest.zip", manifest + 5),
        _flipped(exported, tmp_path / "flipped_directory.zip", exported.stat().st_size - 30),
    ]
    for path in damaged:
        result = run_autocontext(
            "predict", f"--model={path}", f"--input={scan}", f"--output={tmp_path / 'seg.nii.gz'}"
        )
        assert_one_line_error(result, f"Bad model file: {path}")
    assert not (tmp_path / "seg.nii.gz").exists()


def _rewritten(source: pathlib.Path, target: pathlib.Path, change) -> pathlib.Path:
    """A copy of a model file with `change(files)` applied and its digests made to match."""
    with zipfile.ZipFile(source) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    change(files)
    manifest = json.loads(files.pop("manifest.json"))
    manifest["sha256"] = {name: export_lib._digest(data) for name, data in files.items()}
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("manifest.json", json.dumps(manifest))
        for name, data in files.items():
            archive.writestr(name, data)
    return target


def test_another_major_version_or_other_shapes_are_refused_in_one_line(exported, tmp_path):
    def other_version(files):
        manifest = json.loads(files["manifest.json"])
        manifest["package_version"] = "7.0.0"
        files["manifest.json"] = json.dumps(manifest).encode()

    def other_width(files):
        config = json.loads(files["member_0/config.json"])
        config["model"]["width"] = 3
        files["member_0/config.json"] = json.dumps(config).encode()

    cases = {
        "another major version": (other_version, "written by autocontext-jax 7.0.0"),
        "other shapes": (other_width, "the model its config builds expects"),
    }
    for name, (change, expected) in cases.items():
        path = _rewritten(exported, tmp_path / f"{name.replace(' ', '_')}.zip", change)
        with pytest.raises(inference.ModelFileError, match=expected):
            inference.read_model_file(path)
        result = run_autocontext("check", f"--model={path}", f"--workdir={tmp_path / name}")
        assert_one_line_error(result, f"Bad model file: {path}")


def test_export_refuses_an_existing_output_and_runs_that_disagree(
    tiny_run, tiny_phantom, exported, tmp_path
):
    result = run_autocontext("export", f"--workdir={tiny_run}", f"--output={exported}")
    assert_one_line_error(result, f"{exported}: exists")
    other = make_tiny_config(tiny_phantom)
    other.train.steps = 2
    other.eval.at_end = False
    other.data.label_map = ((0, 0), (1, 1), (2, 2))
    other.data.unmapped_labels = "background"
    workdir = tmp_path / "other"
    train(other, str(workdir))
    output = tmp_path / "both.zip"
    result = run_autocontext(
        "export", f"--workdir={tiny_run}", f"--workdir={workdir}", f"--output={output}"
    )
    assert_one_line_error(result, "Cannot ensemble: ")
    assert "label map" in result.stderr and not output.exists()


@pytest.mark.slow
def test_evaluate_with_the_file_scores_as_the_workdir_does(
    exported, tiny_run, tiny_phantom, tmp_path
):
    output = tmp_path / "evaluation"
    result = run_autocontext(
        "evaluate", f"--model={exported}", f"--data={tiny_phantom}", f"--output={output}"
    )
    assert result.returncode == 0, result.stderr
    written = json.loads((output / "eval_cases.json").read_text())
    expected = evaluate_cases(inference.load_run(tiny_run), list_cases(tiny_phantom))
    assert written["case_ids"] == expected["case_ids"]
    for name in ("dice", "hd95", "nsd"):
        assert written[name] == json.loads(json.dumps(expected[name]))


@pytest.mark.slow
def test_check_with_the_file_passes_without_training(exported, tmp_path):
    result = run_autocontext("check", f"--model={exported}", f"--workdir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "PASS  load: step 2 of" in result.stdout and "digests verified" in result.stdout
    assert "PASS  train" not in result.stdout and "All checks passed" in result.stdout


@pytest.mark.slow
def test_a_file_of_two_members_predicts_as_their_ensemble(tiny_run, tiny_phantom, tmp_path):
    output = tmp_path / "folds.zip"
    result = run_autocontext(
        "export", f"--workdir={tiny_run}", f"--workdir={tiny_run}", f"--output={output}"
    )
    assert result.returncode == 0, result.stderr
    members = inference.read_model_file(output)
    assert len(members) == 2
    scan = _scan(tiny_phantom)
    outputs = {}
    for name, flag in (("run", f"--workdir={tiny_run}"), ("file", f"--model={output}")):
        outputs[name] = tmp_path / f"{name}.nii.gz"
        result = run_autocontext("predict", flag, f"--input={scan}", f"--output={outputs[name]}")
        assert result.returncode == 0, result.stderr
    assert "An ensemble of 2" in result.stdout
    # Two copies of one run average to that run's softmax: the same labels.
    np.testing.assert_array_equal(_labels(outputs["run"]), _labels(outputs["file"]))
