"""The training loop: data in, steps run, logs and checkpoints out, resumable from its workdir."""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from autocontext_jax import prepare
from autocontext_jax.config.schema import validate_config
from autocontext_jax.data import cache as cache_lib
from autocontext_jax.data import dataset as dataset_lib
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.pipeline import (
    PreparedCase,
    PyramidExampleSampler,
    read_prepared_case,
    train_batches,
)
from autocontext_jax.data.plan import save_run_plan
from autocontext_jax.models import build_pyramid
from autocontext_jax.runtime import (
    autotune,
    checkpointing,
    environment,
    logs,
    parallel,
    preemption,
    workdir_lock,
)
from autocontext_jax.runtime import progress as progress_lib
from autocontext_jax.runtime.progress import say as _say
from autocontext_jax.training import phases
from autocontext_jax.training.state import TrainState, restore_or_create_state
from autocontext_jax.training.step import Batch, jit_train_step, make_train_steps

# (a train state, the conv_impl training runs) -> (scalars, one line for the user), e.g.
# the held-out Dice; training does not segment whole scans itself, so the caller hands this
# in (cli/train.py), and segments in the lowering training resolved.
Validate = Callable[[TrainState, str], tuple[dict[str, float], str]]


class DivergedError(FloatingPointError):
    """The train state became non-finite; the run stopped before saving it."""


@jax.jit
def _track_first_bad_step(first_bad: jax.Array, finite: jax.Array, step: int) -> jax.Array:
    # Stays on the device and runs asynchronously: the host reads it only where it waits
    # anyway (before a save, at a log step), yet learns the exact step that went bad.
    return jnp.where((first_bad < 0) & ~finite, step, first_bad)


def _stop_if_diverged(first_bad: jax.Array, step: int, manager: ocp.CheckpointManager) -> None:
    """Raise DivergedError, naming the first non-finite step, if any step so far was one."""
    bad = int(first_bad)
    if bad < 0:
        return
    kept = manager.latest_step()
    where = (
        f"the checkpoint of step {kept} in {manager.directory} is the last finite state"
        if kept is not None
        else "no checkpoint was saved"
    )
    raise DivergedError(
        f"the loss, gradients or parameters became non-finite at step {bad}; stopped at "
        f"step {step} without saving; {where} (try a smaller train.learning_rate)"
    )


def prefetch_to_device(
    batches: Iterator[dict[str, np.ndarray]], sharding: jax.sharding.NamedSharding, size: int = 2
) -> Iterator[Batch]:
    """Keep `size` batches on their way to the devices while the current step runs."""
    queue: collections.deque[Batch] = collections.deque()

    def enqueue(count: int) -> None:
        for batch in itertools.islice(batches, count):
            queue.append(parallel.put_batch(batch, sharding))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)


def load_prepared(cases: list[cache_lib.CachedCase]) -> dict[str, PreparedCase]:
    """Memory-map and index every preprocessed training case once."""
    return {
        c.case_id: read_prepared_case(c)
        for c in tqdm.tqdm(cases, desc="reading cases", leave=False, disable=len(cases) < 8)
    }


def prepare_data(
    config: ml_collections.ConfigDict, workdir: pathlib.Path
) -> tuple[PyramidExampleSampler, list[dataset_lib.CaseFiles]]:
    """The training sampler and the held-out cases; the split and plan go to the workdir.

    Cases are preprocessed into the cache first when it is missing or stale.
    """
    plan, cached, train_files, val_files = prepare.preprocess_dataset(config)
    # Cases skipped as bad (data.skip_bad_cases) drop out of both sides of the split.
    train_cases = [cached[f.case_id] for f in train_files if f.case_id in cached]
    if not train_cases:
        raise DatasetError("no usable training case is left after skipping bad ones")
    val_files = [f for f in val_files if f.case_id in cached]
    if jax.process_index() == 0:
        dataset_lib.write_split(
            workdir,
            [c.case_id for c in train_cases],
            [f.case_id for f in val_files],
            prepare.fold_record(config.data),
        )
        save_run_plan(workdir, plan)
    # Worker processes read their own copies; only an in-process pipeline shares these.
    preloaded = load_prepared(train_cases) if config.data.worker_count == 0 else None
    sampler = PyramidExampleSampler(train_cases, config, plan, preloaded=preloaded)
    return sampler, val_files


def _progress_postfix(values: dict[str, float]) -> dict[str, str]:
    postfix = {
        f"L{name.rsplit('_', 1)[1]}": f"{value:.3f}"
        for name, value in values.items()
        if name.startswith("loss_level_")
    }
    postfix["steps/s"] = f"{values['steps_per_second']:.2f}"
    return postfix


def train_loop(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    state: TrainState,
    train_steps: Sequence[Callable],
    batches: Iterator[Batch],
    manager: ocp.CheckpointManager,
    rng: jax.Array,
    pipeline_state: Callable[[int], dict] | None = None,
    stop: preemption.StopSignals | None = None,
    validate: Validate | None = None,
    conv_impl: str = "auto",
) -> TrainState:
    """Run the steps from state.step to train.steps, logging and checkpointing as configured.

    `train_steps` are the compiled steps of the run's phases (`step.make_train_steps`);
    `phases.phase_of` picks one for each step number, on the host.

    `pipeline_state(k)` is the input pipeline's state after step k's batch, saved with the
    checkpoint of step k. When `stop` says so after a step (a SIGTERM), that step is saved
    and preemption.StoppedBySignalError raised. `validate(state, conv_impl)` runs every
    `eval.every` steps; its scalars go to the logs with the seconds it took (`val_seconds`),
    its line to the user. `conv_impl` is the lowering the steps were built with.
    """
    stop = stop or preemption.StopSignals()

    def save_args(state: TrainState, step: int):
        return checkpointing.save_args(state, pipeline_state(step) if pipeline_state else {})

    start_step = int(state.step)
    progress = progress_lib.StepProgress(config.train.steps, start_step)
    writer = logs.MetricWriter(workdir, start_step=start_step)
    last_time, last_step = time.perf_counter(), start_step
    first_bad = np.int32(-1)
    saving = False
    eval_every = config.eval.every if validate is not None else 0
    finished = False
    try:
        for step in range(start_step + 1, config.train.steps + 1):
            train_step = train_steps[phases.phase_of(config, step - 1)]
            state, metrics = train_step(state, next(batches), rng)
            first_bad = _track_first_bad_step(first_bad, metrics.pop("finite"), step)
            # A background save that failed (a full disk) stops the run now, not at the next
            # save; reading the manager's flag costs no synchronisation with the device.
            if saving:
                saving = checkpointing.check_saves(manager, step)
            if step == start_step + 1:
                # The first step compiles: waiting for it once times the compilation and
                # keeps it out of the bar's rate and the first steps/s.
                first_bad.block_until_ready()
                progress.compiled(step)
                last_time, last_step = time.perf_counter(), step
            if step % config.train.checkpoint_every == 0:
                # The save waits for the state anyway; only finite states are saved, so
                # the checkpoints it rotates out are never traded for a bad one.
                _stop_if_diverged(first_bad, step, manager)
                checkpointing.save(manager, step, save_args(state, step))
                saving = True
                progress.completed(step)
            if step % config.train.log_every == 0 or step == config.train.steps:
                # The only host synchronisation of the loop besides the saves.
                _stop_if_diverged(first_bad, step, manager)
                values = {name: float(value) for name, value in jax.device_get(metrics).items()}
                now = time.perf_counter()
                values["steps_per_second"] = (step - last_step) / max(now - last_time, 1e-9)
                last_time, last_step = now, step
                progress.completed(step)
                progress.set_postfix(_progress_postfix(values))
                writer.write_scalars(step, values)
            if eval_every and step % eval_every == 0:
                _stop_if_diverged(first_bad, step, manager)  # never validate a bad state
                started = time.perf_counter()
                scalars, line = validate(state, conv_impl)
                seconds = time.perf_counter() - started
                if scalars:
                    writer.write_scalars(step, {**scalars, "val_seconds": seconds})
                progress.validated(seconds, line)
                progress.completed(step)
                last_time += seconds  # steps/s counts training only
            if step < config.train.steps and stop.stop_at(step):
                # Saved as at the end of a run: finite states only, and committed before
                # the process exits.
                _stop_if_diverged(first_bad, step, manager)
                if manager.latest_step() != step:
                    checkpointing.save(manager, step, save_args(state, step), force=True)
                checkpointing.finish_saves(manager, step)
                checkpoint = str(manager.directory / str(step))
                raise preemption.StoppedBySignalError(step, stop.received, checkpoint)
        _stop_if_diverged(first_bad, int(state.step), manager)
        final = int(state.step)
        checkpointing.finish_saves(manager, final)
        if manager.latest_step() != final:
            checkpointing.save(manager, final, save_args(state, final), force=True)
        checkpointing.finish_saves(manager, final)
        finished = True
    finally:
        progress.close(int(state.step) if finished else None)
        writer.close()
        # A save in flight holds a finite state: let it commit, whatever stopped the loop.
        manager.wait_until_finished()
    return state


def absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose data folders are absolute, so the run works from anywhere."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.dir = str(pathlib.Path(config.data.dir).absolute())
        if config.data.cache_dir:
            config.data.cache_dir = str(pathlib.Path(config.data.cache_dir).absolute())
    return config


def train(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    validate: Validate | None = None,
    lowering_cache: str | os.PathLike = "",
) -> int:
    """Train the pyramid in `workdir`, resuming from its newest checkpoint; the final step.

    The workdir gets the resolved config (data folders made absolute), the split, the
    plan, the checkpoints and the logs; evaluation reads the run back from there.
    `validate` (see `train_loop`) runs every `eval.every` steps. `model.conv_impl` is
    resolved for this host once the data is ready (`autotune.resolve_lowering`: `auto`
    timed once per host and shapes, the choice kept in `lowering_cache`; '': untimed);
    the saved config keeps what it asked for, environment.jsonl and the start block say
    what it resolved to.
    """
    validate_config(config, jax.device_count())
    config = absolute_paths(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        # One writer per workdir (process 0 writes for the run), from before the config is
        # written to after the last checkpoint commits.
        if jax.process_index() == 0:
            note = held.enter_context(workdir_lock.hold(workdir))
            if note:
                _say(note)
        return _train_in(config, workdir, validate, lowering_cache)


def _train_in(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    validate: Validate | None,
    lowering_cache: str | os.PathLike,
) -> int:
    """`train`'s work once the workdir is held."""
    if jax.process_index() == 0:
        checkpointing.write_config(workdir, config, refuse=phases.moved_phases)
    sampler, _ = prepare_data(config, workdir)
    # After the data, whose problems are worth hearing before a first timing of seconds.
    lowering = autotune.resolve_lowering(config, lowering_cache, say=_say)

    model = build_pyramid(config, lowering.conv_impl)
    optimizer = phases.make_run_optimizer(config)
    mesh = parallel.make_mesh()
    manager = checkpointing.make_manager(workdir, config)
    state, restored_step, saved_pipeline = restore_or_create_state(
        manager, model, optimizer, config.seed, parallel.replicated(mesh)
    )
    if restored_step is not None:
        _say(f"Resuming from the checkpoint of step {restored_step} in {workdir}")
    # A finished run called again only re-evaluates: it trains nothing on this stack.
    if jax.process_index() == 0 and (restored_step or 0) < config.train.steps:
        previous = environment.read_environments(workdir)
        record = environment.append_environment(workdir, restored_step or 0, lowering.record())
        note = environment.resume_note(previous, record)
        if note:
            _say(note)
    if jax.process_index() == 0:
        split = dataset_lib.read_split(workdir)
        _say(
            progress_lib.start_block(
                config,
                workdir.absolute(),
                model,
                state.params,
                len(split["train"]),
                len(split["val"]),
                restored_step or 0,
                validate is not None,
                lowering.describe(),
            )
        )
    host_batches = train_batches(
        sampler,
        config,
        restored_step or 0,
        jax.process_index(),
        jax.process_count(),
        saved_state=saved_pipeline,
    )
    batches = prefetch_to_device(host_batches, parallel.batch_sharded(mesh))
    # One compiled step per phase; jit compiles each on its first call.
    train_steps = [
        jit_train_step(fn, mesh, model.conv_impl)
        for fn in make_train_steps(model, optimizer, config)
    ]
    rng = parallel.replicated_key(config.seed + 1, mesh)
    try:
        # Before the steps a signal ends the process as usual: nothing is lost but the
        # preparation (the cache is written atomically).
        with preemption.StopSignals() as stop:
            state = train_loop(
                config,
                workdir,
                state,
                train_steps,
                batches,
                manager,
                rng,
                host_batches.state_at,
                stop,
                validate,
                model.conv_impl,
            )
    finally:
        manager.close()
    return int(state.step)
