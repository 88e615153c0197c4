"""What a finished run leaves: reports, TensorBoard events, and the evaluate and plot commands."""

import json

import numpy as np
import pytest
from conftest import CommandResult, read_events, run_autocontext
from PIL import Image

from autocontext_jax.cli.train import train_and_evaluate
from autocontext_jax.evaluation.evaluate import evaluate_workdir
from autocontext_jax.evaluation.figures import plot_run
from autocontext_jax.runtime import logs


def _evaluate(*args: str) -> CommandResult:
    """`autocontext evaluate ARGS...`, in this process."""
    return run_autocontext("evaluate", *args)


@pytest.fixture(scope="module")
def trained_run(tiny_phantom, tmp_path_factory):
    """A two-step tiny run that evaluated its held-out case at the end."""
    from conftest import make_tiny_config

    config = make_tiny_config(tiny_phantom)
    config.train.steps = 2
    workdir = tmp_path_factory.mktemp("run")
    train_and_evaluate(config, str(workdir))
    # Later tests re-evaluate into the workdir; keep what training itself wrote.
    (workdir / "at_end.json").write_text((workdir / "eval_cases.json").read_text())
    return workdir


@pytest.mark.slow
def test_the_command_reproduces_the_end_of_training_report(trained_run):
    at_end = json.loads((trained_run / "at_end.json").read_text())
    for name in ("eval_cases.json", "eval_summary.md", "eval_summary.csv", "eval_summary.json"):
        (trained_run / name).unlink()
    result = _evaluate("--workdir", str(trained_run))
    assert result.returncode == 0, result.stderr
    assert "| HD95 (mm) | artery |" in result.stdout
    again = json.loads((trained_run / "eval_cases.json").read_text())
    assert again["step"] == 2
    assert again == at_end
    for name in ("eval_summary.md", "eval_summary.csv", "eval_summary.json"):
        assert (trained_run / name).is_file()


def test_evaluating_another_dataset_scores_all_its_cases(trained_run, tiny_phantom):
    result = evaluate_workdir(trained_run, data_dir=str(tiny_phantom))
    cases = json.loads((trained_run / "eval_cases.json").read_text())
    assert cases == json.loads(json.dumps(result))
    assert len(cases["case_ids"]) == 5 and len(cases["hd95"]["level_2"]) == 5


@pytest.mark.slow
def test_the_command_names_a_workdir_without_a_run(tmp_path):
    result = _evaluate("--workdir", str(tmp_path))
    assert result.returncode != 0
    assert f"{tmp_path / 'config.json'}: no config.json" in result.stderr


def _scalars(events):
    return {
        (value.tag, event.step): value.simple_value
        for event in events
        for value in event.summary.value
        if value.HasField("simple_value")
    }


def test_training_writes_tensorboard_scalars_and_a_prediction_image(trained_run):
    events = read_events(trained_run / logs.TENSORBOARD_DIR)
    scalars = _scalars(events)
    jsonl = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    for record in jsonl:
        step = record["step"]
        assert scalars[("loss/total", step)] == pytest.approx(record["loss"])
        assert scalars[("loss/level_2", step)] == pytest.approx(record["loss_level_2"])
        assert scalars[("train/learning_rate", step)] == pytest.approx(record["learning_rate"])
        assert ("train/steps_per_second", step) in scalars
    cases = json.loads((trained_run / "at_end.json").read_text())
    dice_average = np.mean(cases["dice"]["level_2"])
    assert scalars[("dice/level_2/average", 2)] == pytest.approx(dice_average)
    assert ("hd95/level_1/liver", 2) in scalars
    images = [
        value
        for event in events
        for value in event.summary.value
        if value.HasField("image") and value.tag.startswith("prediction/axial/")
    ]
    assert len(images) == 1
    # CT, reference and two levels side by side, each as wide as the volume's X (48).
    assert images[0].image.width == 4 * 48 + 3 * 2


def test_tensorboard_tags_group_the_charts():
    assert logs.tensorboard_tag("loss") == "loss/total"
    assert logs.tensorboard_tag("loss_level_3") == "loss/level_3"
    assert logs.tensorboard_tag("grad_norm") == "train/grad_norm"
    assert logs.tensorboard_tag("dice/level_1/liver") == "dice/level_1/liver"


def test_a_nan_scalar_goes_to_the_jsonl_only_without_a_warning(tmp_path, capfd):
    # A separate run logs the loss of a level not yet trained as NaN at every log line.
    writer = logs.MetricWriter(tmp_path)
    writer.write_scalars(10, {"loss": 0.5, "loss_level_2": float("nan")})
    writer.close()
    line = json.loads((tmp_path / logs.METRICS_FILE).read_text())
    assert line["loss"] == 0.5 and np.isnan(line["loss_level_2"])
    tags = {
        value.tag
        for event in read_events(tmp_path / logs.TENSORBOARD_DIR)
        for value in event.summary.value
    }
    assert tags == {"loss/total"}
    assert "NaN" not in capfd.readouterr().err


def test_plot_writes_slices_and_curves(trained_run):
    held_out = json.loads((trained_run / "split.json").read_text())["val"][0]
    paths = plot_run(trained_run)
    assert [p.name for p in paths] == [
        f"{held_out}_axial.png",
        f"{held_out}_coronal.png",
        "training_curves.png",
    ]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > image.height > 100


def test_plot_names_a_case_it_cannot_find(trained_run):
    with pytest.raises(Exception, match="'nope' is not among the cases"):
        plot_run(trained_run, case_id="nope")
