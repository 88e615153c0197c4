"""What training tells the user and logs: start block, progress, validation, end, curves."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tqdm
from conftest import read_events

from autocontext_jax.cli.train import train_and_evaluate
from autocontext_jax.evaluation.evaluate import evaluate_cases, held_out_cases
from autocontext_jax.evaluation.figures import curves_figure, plot_run, read_metrics
from autocontext_jax.inference import load_run
from autocontext_jax.models import build_pyramid
from autocontext_jax.models.init import abstract_variables, count_parameters
from autocontext_jax.runtime import progress
from autocontext_jax.training import loop

STEPS, EVAL_EVERY = 4, 2


@jax.jit
def _late(loss):
    """`loss` itself, ready only once about a gigaflop more has run on the device."""
    matrix = jnp.full((192, 192), 0.01, jnp.float32) + loss * 0.0
    busy = jax.lax.fori_loop(0, 150, lambda _, m: jnp.tanh(m @ m), matrix)
    return loss + 0.0 * jnp.sum(busy)


@pytest.fixture(scope="module")
def run_output(tiny_phantom, tmp_path_factory):
    """A 4-step tiny run validating every 2 steps: (workdir, config, output, bar record).

    The bar record holds, for each time the train bar moved, its new count and whether
    the train state of that step had been computed on the device by then.
    """
    from conftest import make_tiny_config

    config = make_tiny_config(tiny_phantom)
    config.train.steps = STEPS
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.train.keep_checkpoints = 3
    config.eval.every = EVAL_EVERY
    config.eval.num_cases = 1
    workdir = tmp_path_factory.mktemp("run")
    states, moves = {}, []
    jit_train_step = loop.jit_train_step

    def recording_jit(step_fn, mesh, conv_impl):
        compiled = jit_train_step(step_fn, mesh, conv_impl)

        def step(state, batch, rng):
            new_state, metrics = compiled(state, batch, rng)
            # The loss of step k arrives only after a computation of a few tenths of a
            # second on the device (its value unchanged), kept to ask later whether the
            # device had finished it: a bar that moved without waiting would find it not ready.
            metrics = {**metrics, "loss": _late(metrics["loss"])}
            states[len(states) + 1] = metrics["loss"]
            return new_state, metrics

        return step

    update = tqdm.tqdm.update

    def recording_update(bar, n=1):
        result = update(bar, n)
        if bar.desc == "train":
            moves.append((bar.n, states[bar.n].is_ready()))
        return result

    output = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "jit_train_step", recording_jit)
        patch.setattr(tqdm.tqdm, "update", recording_update)
        with contextlib.redirect_stdout(output):
            train_and_evaluate(config, str(workdir))
    return workdir, config, output.getvalue(), moves


def test_the_start_block_names_devices_parameters_cases_and_workdir(run_output):
    workdir, config, output, _ = run_output
    model = build_pyramid(config)
    params = abstract_variables(model)["params"]
    level_1, total = count_parameters(params["level_1"]), count_parameters(params)
    expected = [
        f"Training in {workdir}",
        f"  devices: {jax.device_count()} cpu device",
        "  convolution: depth_folded (YNNPACK off), as model.conv_impl names it",
        "  parameters:",
        f"    level 1: downsample x4, 1 input channel, {level_1:,} parameters",
        f"    total: {total:,} parameters",
        "  cases: 4 training, 1 held out (validation every 2 steps on all of them)",
        "  steps: 4 steps of batch 2",
        "  compiling the train step ...",
        "  compiled and ran the first step in ",
        "step 2 validation Dice (%), finest level, 1 held-out case: artery ",
        "step 4 validation Dice (%)",
        "Trained steps 1 to 4 in ",
    ]
    positions = [output.find(text) for text in expected]
    assert -1 not in positions, [t for t, p in zip(expected, positions, strict=True) if p < 0]
    assert positions == sorted(positions), output
    assert "s validating (" in output


def test_the_end_message_names_the_final_level_results_and_next_command(run_output):
    workdir, _, output, _ = run_output
    end = output[output.index("Finished step 4") :]
    assert output.index("## Dice (%)") < output.index("Finished step 4")
    assert "final output: level 2 of 2, the finest" in end
    assert f"checkpoints: {workdir / 'checkpoints'} (steps 2, 4;" in end
    assert f"reports: {workdir / 'eval_summary.md'}" in end
    assert f"next: autocontext predict --workdir {workdir} --input" in end
    assert f"autocontext plot --workdir {workdir}" in end


def test_the_bar_moves_only_to_steps_the_device_has_finished(run_output):
    _, _, _, moves = run_output
    # The bar starts at step 1, once its compilation has run; then it moves only where the
    # loop waits anyway: the save and the log of step 2, and of step 4.
    assert [count for count, _ in moves] == [2, 4]
    assert all(ready for _, ready in moves)


def test_validation_equals_evaluating_that_checkpoint(run_output):
    workdir, _, _, _ = run_output
    records = [r for r in read_metrics(workdir) if "val_dice/average" in r]
    assert [r["step"] for r in records] == [2, 4]
    scalars = {
        (value.tag, event.step): value.simple_value
        for event in read_events(workdir / "tensorboard")
        for value in event.summary.value
    }
    for record in records:
        run = load_run(workdir, record["step"])
        result = evaluate_cases(run, held_out_cases(run)[:1])
        means = np.mean(result["dice"]["level_2"], axis=0)
        for name, value in zip(result["classes"], means, strict=True):
            assert record[f"val_dice/{name}"] == value, name
        assert record["val_dice/average"] == pytest.approx(means.mean(), abs=1e-12)
        assert record["val_cases"] == 1 and record["val_seconds"] > 0
        assert scalars[("val_dice/average", record["step"])] == pytest.approx(
            record["val_dice/average"]
        )


def test_the_curves_show_smoothed_losses_and_the_validation_dice(run_output):
    workdir, _, _, _ = run_output
    records = read_metrics(workdir)
    figure = curves_figure(records)
    dice_axes = [ax for ax in figure.axes if ax.get_ylabel() == "Dice (%)"]
    assert len(dice_axes) == 1
    lines = {line.get_label(): line for line in dice_axes[0].get_lines()}
    validation = [r for r in records if "val_dice/average" in r]
    np.testing.assert_allclose(lines["average"].get_xdata(), [2, 4])
    np.testing.assert_allclose(
        lines["average"].get_ydata(), [100 * r["val_dice/average"] for r in validation]
    )
    assert "liver" in lines
    assert all(ax.get_xlabel() == "step" and ax.get_ylabel() for ax in figure.axes)
    paths = plot_run(workdir)
    assert paths[-1].name == "training_curves.png" and paths[-1].stat().st_size > 10_000


def test_the_start_block_names_the_fold_of_a_cross_validated_run(tiny_config, tmp_path):
    tiny_config.data.num_folds, tiny_config.data.fold = 5, 2
    model = build_pyramid(tiny_config)
    params = abstract_variables(model)["params"]
    block = progress.start_block(tiny_config, tmp_path, model, params, 16, 4, 0, False)
    assert "  cases: 16 training, 4 held out by fold 2 of 5 (no validation during training)" in (
        block.splitlines()
    )


def test_the_start_block_says_which_convolution_runs(tiny_config, tmp_path):
    model = build_pyramid(tiny_config)
    params = abstract_variables(model)["params"]
    line = "folded (YNNPACK off) (auto: timed on this host in 3.1 s, kept in X; ...)"
    block = progress.start_block(tiny_config, tmp_path, model, params, 16, 4, 0, False, line)
    assert block.splitlines()[2] == f"  convolution: {line}"
