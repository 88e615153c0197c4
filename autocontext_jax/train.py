"""Training the pyramid: state, the jitted data-parallel train step, and the loop."""

from __future__ import annotations

import collections
import itertools
import json
import math
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from autocontext_jax import checkpointing, evaluate, logs, parallel
from autocontext_jax.config_checks import validate_config
from autocontext_jax.data import dataset as dataset_lib
from autocontext_jax.data import phantom, preprocess
from autocontext_jax.data.pipeline import (
    PreparedCase,
    PyramidExampleSampler,
    read_prepared_case,
    train_batches,
)
from autocontext_jax.losses import segmentation_loss
from autocontext_jax.models import build_pyramid, conv

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree, so it can be donated and saved."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    # Exponential moving average of the parameters (train.ema_decay), used to evaluate.
    ema_params: Any


def make_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning-rate schedule named by `train.schedule`."""
    if train_config.schedule == "constant":
        return optax.constant_schedule(train_config.learning_rate)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train_config.learning_rate,
        warmup_steps=train_config.warmup_steps,
        decay_steps=train_config.steps,
        end_value=train_config.learning_rate * train_config.final_lr_fraction,
    )


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with the configured schedule."""
    return optax.adam(make_schedule(train_config))


def init_variables(model: nn.Module, seed: int) -> dict[str, Any]:
    """Initial parameters and BatchNorm statistics of the pyramid.

    Parameters do not depend on the spatial size, so the smallest valid crop is used;
    the 'rbg' generator compiles several times faster than threefry for this many
    initialisers, and initialisation happens once.
    """
    edge = 2**model.num_poolings
    images = [jnp.zeros((1, edge, edge, edge, model.in_channels))] * model.num_levels
    init = jax.jit(model.init, static_argnames="train")
    return init(jax.random.key(seed, impl="rbg"), images, train=False)


def create_train_state(
    model: nn.Module, optimizer: optax.GradientTransformation, seed: int
) -> TrainState:
    """A fresh train state at step 0."""
    variables = init_variables(model, seed)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=optimizer.init(params),
        # A copy: the step donates the state, and one buffer cannot be donated twice.
        ema_params=jax.tree.map(jnp.copy, params),
    )


def abstract_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    seed: int,
    sharding: jax.sharding.Sharding,
) -> TrainState:
    """The train state's shapes, dtypes and sharding, without computing it.

    A checkpoint restored into this never compiles and runs the initialisation only to
    overwrite it.
    """
    abstract = jax.eval_shape(lambda: create_train_state(model, optimizer, seed))
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract
    )


def restore_or_create_state(
    manager: ocp.CheckpointManager,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    seed: int,
    sharding: jax.sharding.Sharding,
) -> tuple[TrainState, int | None]:
    """(state, step) of the newest checkpoint of `manager`, or a fresh state and None."""
    target = abstract_train_state(model, optimizer, seed, sharding)
    state, step = checkpointing.restore_latest(manager, target)
    if step is None:
        state = jax.device_put(create_train_state(model, optimizer, seed), sharding)
    return state, step


def count_parameters(tree: Any) -> int:
    """Total number of scalars in a pytree of arrays or shape structs."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def augment_intensity(
    rng: jax.Array, image: jax.Array, augment: ml_collections.ConfigDict
) -> jax.Array:
    """Random per-example gamma, intensity scale, shift and noise of (B, S, D, H, W, C) images.

    Gamma, scale and shift are shared by the levels of an example (one anatomy, one
    scanner); each is applied with probability `augment.probability`. Gamma acts on the
    example's own intensity range, mapped to [0, 1] and back.
    """
    batch = image.shape[0]
    keys = jax.random.split(rng, 6)
    example_shape = (batch,) + (1,) * (image.ndim - 1)

    def draw(key_apply: jax.Array, key_value: jax.Array, low: float, high: float, neutral):
        apply = jax.random.bernoulli(key_apply, augment.probability, example_shape)
        value = jax.random.uniform(key_value, example_shape, minval=low, maxval=high)
        return jnp.where(apply, value, neutral)

    scale = draw(keys[0], keys[1], 1 - augment.intensity_scale, 1 + augment.intensity_scale, 1.0)
    shift = draw(keys[2], keys[3], -augment.intensity_shift, augment.intensity_shift, 0.0)
    noise_std = draw(keys[4], keys[5], 0.0, augment.noise_std, 0.0)
    noise = jax.random.normal(jax.random.fold_in(rng, 1), image.shape, image.dtype)
    if augment.gamma > 0:
        # Its own keys, so the draws above stay what they were without gamma.
        gamma_keys = jax.random.split(jax.random.fold_in(rng, 2), 2)
        log_gamma = draw(*gamma_keys, -augment.gamma, augment.gamma, 0.0)
        axes = tuple(range(1, image.ndim))
        low = jnp.min(image, axis=axes, keepdims=True)
        span = jnp.max(image, axis=axes, keepdims=True) - low + 1e-6
        gamma_image = ((image - low) / span) ** jnp.exp(log_gamma) * span + low
        image = jnp.where(log_gamma == 0.0, image, gamma_image)
    return image * scale + shift + noise * noise_std


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """One step of the parameter average; early steps use a shorter memory (1+t)/(10+t)."""
    rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema, params)


def evaluation_variables(state: TrainState, train_config: ml_collections.ConfigDict) -> dict:
    """The variables to evaluate: averaged parameters when train.ema_decay > 0."""
    params = state.ema_params if train_config.ema_decay > 0 else state.params
    return {"params": params, "batch_stats": state.batch_stats}


def make_train_step(
    model: nn.Module, optimizer: optax.GradientTransformation, config: ml_collections.ConfigDict
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """The pure train step (state, batch, rng) -> (state, metrics) for `model`.

    `batch["image"]` is (B, S, c, c, c, C) and `batch["label"]` (B, S, c, c, c, K), level 1
    (coarsest) first. The total loss is the sum of the level losses; whether level s-1
    learns from level s's loss is decided by the pyramid's mode.
    """
    schedule = make_schedule(config.train)
    num_levels = config.pyramid.levels

    def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(rng, state.step)
        image = augment_intensity(rng, batch["image"], config.augment)
        images = [image[:, s] for s in range(num_levels)]
        targets = [batch["label"][:, s] for s in range(num_levels)]

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            level_losses = jnp.stack(
                [
                    segmentation_loss(
                        config.loss.name,
                        level_logits,
                        level_targets,
                        config.loss.dice_background,
                    )
                    for level_logits, level_targets in zip(logits, targets, strict=True)
                ]
            )
            return jnp.sum(level_losses), (level_losses, updates["batch_stats"])

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (level_losses, batch_stats)), grads = grad_fn(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            ema_params=ema_update(state.ema_params, params, state.step, config.train.ema_decay),
        )
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
        }
        for s in range(num_levels):
            metrics[f"loss_level_{s + 1}"] = level_losses[s]
        return new_state, metrics

    return train_step


def jit_train_step(
    train_step: Callable, mesh: jax.sharding.Mesh
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """Compile the step over `mesh`: batch split on its leading axis, the rest replicated.

    The state is donated so parameters and optimiser moments are updated in place.
    """
    replicated = parallel.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(replicated, parallel.batch_sharded(mesh), replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
        compiler_options=conv.compiler_options(),
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


def ensure_dataset(data_config: ml_collections.ConfigDict) -> pathlib.Path:
    """The dataset folder; generates the phantom there when it is missing or empty."""
    data_dir = pathlib.Path(data_config.dir)
    empty = not data_dir.exists() or not any(data_dir.iterdir())
    if empty and data_config.phantom_cases > 0:
        _say(f"Generating {data_config.phantom_cases} phantom cases in {data_dir}")
        phantom.write_phantom_dataset(data_dir, data_config.phantom_cases, seed=0, workers=2)
    return data_dir


def load_prepared(cases: list[preprocess.CachedCase]) -> dict[str, PreparedCase]:
    """Memory-map and index every preprocessed training case once."""
    return {
        c.case_id: read_prepared_case(c)
        for c in tqdm.tqdm(cases, desc="reading cases", leave=False, disable=len(cases) < 8)
    }


def _say(message: str) -> None:
    """Tell the user (process 0 only); absl logging is left to library chatter."""
    if jax.process_index() == 0:
        print(message, flush=True)


def prepare_data(
    config: ml_collections.ConfigDict, workdir: pathlib.Path
) -> tuple[PyramidExampleSampler, list[dataset_lib.CaseFiles]]:
    """The training sampler and the held-out cases; the split is written to the workdir.

    Cases are preprocessed into the cache first when it is missing or stale.
    """
    ensure_dataset(config.data)
    files = dataset_lib.list_dataset(config.data)
    train_files, val_files = dataset_lib.split_cases(
        files, config.data.num_val_cases, config.data.split_seed
    )
    plan, cached = preprocess.ensure_preprocessed(config, files, train_files)
    # Cases skipped as bad (data.skip_bad_cases) drop out of both sides of the split.
    train_cases = [cached[f.case_id] for f in train_files if f.case_id in cached]
    if not train_cases:
        raise dataset_lib.DatasetError("no usable training case is left after skipping bad ones")
    val_files = [f for f in val_files if f.case_id in cached]
    if jax.process_index() == 0:
        split = {"train": [c.case_id for c in train_cases], "val": [f.case_id for f in val_files]}
        (workdir / "split.json").write_text(json.dumps(split, indent=2) + "\n")
        preprocess.save_run_plan(workdir, plan)
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
    train_step: Callable,
    batches: Iterator[Batch],
    manager: checkpointing.ocp.CheckpointManager,
    rng: jax.Array,
    pipeline_state: Callable[[int], dict] | None = None,
) -> TrainState:
    """Run the steps from state.step to train.steps, logging and checkpointing as configured.

    `pipeline_state(k)` is the input pipeline's state after step k's batch, saved with the
    checkpoint of step k.
    """

    def save_args(state: TrainState, step: int):
        return checkpointing.save_args(state, pipeline_state(step) if pipeline_state else {})

    start_step = int(state.step)
    progress = tqdm.tqdm(
        total=config.train.steps,
        initial=start_step,
        desc="train",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
    writer = logs.MetricWriter(workdir)
    last_time, last_step = time.perf_counter(), start_step
    for step in range(start_step + 1, config.train.steps + 1):
        state, metrics = train_step(state, next(batches), rng)
        if step % config.train.checkpoint_every == 0:
            manager.save(step, args=save_args(state, step))
        progress.update(1)
        if step % config.train.log_every == 0 or step == config.train.steps:
            # The only host synchronisation of the loop.
            values = {name: float(value) for name, value in jax.device_get(metrics).items()}
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(f"loss is {values['loss']} at step {step}; stopping")
            now = time.perf_counter()
            values["steps_per_second"] = (step - last_step) / max(now - last_time, 1e-9)
            last_time, last_step = now, step
            progress.set_postfix(_progress_postfix(values))
            writer.write_scalars(step, values)
    progress.close()
    writer.close()
    if manager.latest_step() != int(state.step):
        manager.save(int(state.step), args=save_args(state, int(state.step)), force=True)
    manager.wait_until_finished()
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train the pyramid in `workdir` (resuming if it holds a checkpoint), then evaluate."""
    validate_config(config, jax.device_count())
    workdir_path = pathlib.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        checkpointing.write_config(workdir_path, config)
    sampler, val_files = prepare_data(config, workdir_path)

    model = build_pyramid(config)
    optimizer = make_optimizer(config.train)
    mesh = parallel.make_mesh()
    manager = checkpointing.make_manager(workdir_path, config)
    state, restored_step = restore_or_create_state(
        manager, model, optimizer, config.seed, parallel.replicated(mesh)
    )
    if restored_step is not None:
        _say(f"Resuming from the checkpoint of step {restored_step} in {workdir}")
    saved_pipeline = None
    if restored_step is not None:
        saved_pipeline = checkpointing.restore_pipeline_state(manager, restored_step)
    host_batches = train_batches(
        sampler,
        config,
        restored_step or 0,
        jax.process_index(),
        jax.process_count(),
        saved_state=saved_pipeline,
    )
    batches = prefetch_to_device(host_batches, parallel.batch_sharded(mesh))
    train_step = jit_train_step(make_train_step(model, optimizer, config), mesh)
    rng = parallel.replicated_key(config.seed + 1, mesh)
    state = train_loop(
        config, workdir_path, state, train_step, batches, manager, rng, host_batches.state_at
    )

    result: dict[str, Any] = {"step": int(state.step)}
    if config.eval.at_end and val_files:
        variables = evaluation_variables(state, config.train)
        scores = evaluate.evaluate_cases(model, variables, val_files, config)
        result["dice"] = scores
        # Every process predicts (the variables span them all); process 0 writes.
        image = evaluate.prediction_panel(model, variables, val_files[0], config, "axial")
        writer = logs.MetricWriter(workdir_path)
        writer.write_scalars(result["step"], evaluate.mean_scores(scores), to_jsonl=False)
        writer.write_image(result["step"], f"prediction/axial/{val_files[0].case_id}", image)
        writer.close()
        if jax.process_index() == 0:
            evaluate.write_report(workdir_path, scores, val_files)
            print(evaluate.summary_markdown(scores))
    return result
