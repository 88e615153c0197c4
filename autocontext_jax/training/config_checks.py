"""Refuse a bad configuration at start, with a message that names the field."""

from __future__ import annotations

import math

import ml_collections

from autocontext_jax.data.device_augment import AUGMENT_DEVICES
from autocontext_jax.models import COMPUTE_DTYPES
from autocontext_jax.models.conv import CONV_IMPLS
from autocontext_jax.models.pyramid import CONTEXT_MODES
from autocontext_jax.training.losses import LOSS_NAMES

MAX_PYRAMID_LEVELS = 4
SCHEDULES = ("constant", "cosine")
CENTRE_SAMPLING = ("foreground", "class_balanced")
NORMALIZATIONS = ("window", "foreground_zscore")
LABEL_INTERPOLATIONS = ("linear_argmax", "nearest")
UNMAPPED_LABELS = ("background", "error")
AUGMENT_PROBABILITIES = (
    "probability",
    "rotation_probability",
    "scale_probability",
    "translation_probability",
    "elastic_probability",
)


class ConfigError(ValueError):
    """A configuration field has a value the run cannot use."""


def _require(condition: bool, field: str, value: object, why: str) -> None:
    if not condition:
        raise ConfigError(f"config.{field}={value!r}: {why}")


def fit_to_run_length(
    config: ml_collections.ConfigDict,
) -> tuple[ml_collections.ConfigDict, list[str]]:
    """A copy of `config` whose warm-up and intervals fit in train.steps, and a line per change.

    A short run (`--config.train.steps=4` on the default config) should just train: a
    warm-up that is not shorter than the run is capped to train.steps - 1, and checkpoint,
    log or validation (eval.every) intervals longer than the run become train.steps (the
    last step is saved and logged anyway, and so validated once).
    """
    config = config.copy_and_resolve_references()
    train, notes = config.train, []
    steps = train.steps
    if not isinstance(steps, int) or steps < 1:
        return config, notes  # validate_config names the field
    if train.schedule != "constant" and train.warmup_steps >= steps:
        notes.append(
            f"config.train.warmup_steps={train.warmup_steps} is not shorter than "
            f"train.steps={steps}: using {steps - 1}"
        )
        train.warmup_steps = steps - 1
    intervals = [(train, "train", "checkpoint_every"), (train, "train", "log_every")]
    intervals.append((config.eval, "eval", "every"))
    for section, section_name, name in intervals:
        if section[name] > steps:
            notes.append(
                f"config.{section_name}.{name}={section[name]} exceeds train.steps={steps}: "
                f"using {steps}"
            )
            section[name] = steps
    return config, notes


def validate_config(config: ml_collections.ConfigDict, device_count: int) -> None:
    """Raise ConfigError naming the first field whose value cannot work."""
    model, pyramid, data, train = config.model, config.pyramid, config.data, config.train
    levels = pyramid.levels
    _require(
        isinstance(levels, int) and 1 <= levels <= MAX_PYRAMID_LEVELS,
        "pyramid.levels",
        levels,
        f"must be an integer from 1 to {MAX_PYRAMID_LEVELS}",
    )
    _require(pyramid.mode in CONTEXT_MODES, "pyramid.mode", pyramid.mode, f"one of {CONTEXT_MODES}")
    _check_level_steps(config)
    _check_context_options(pyramid)
    _require(model.width >= 1, "model.width", model.width, "must be positive")
    _require(model.num_poolings >= 1, "model.num_poolings", model.num_poolings, "must be >= 1")
    _require(model.in_channels >= 1, "model.in_channels", model.in_channels, "must be >= 1")
    _require(model.num_classes >= 2, "model.num_classes", model.num_classes, "must be >= 2")
    _require(
        model.compute_dtype in COMPUTE_DTYPES,
        "model.compute_dtype",
        model.compute_dtype,
        f"one of {tuple(COMPUTE_DTYPES)}",
    )
    _require(
        model.conv_impl in CONV_IMPLS, "model.conv_impl", model.conv_impl, f"one of {CONV_IMPLS}"
    )
    multiple = 2**model.num_poolings
    _require(
        isinstance(data.crop_size, int) and data.crop_size > 0 and data.crop_size % multiple == 0,
        "data.crop_size",
        data.crop_size,
        f"must be a positive multiple of 2^model.num_poolings = {multiple}",
    )
    _require(config.loss.name in LOSS_NAMES, "loss.name", config.loss.name, f"one of {LOSS_NAMES}")
    _require(train.steps >= 1, "train.steps", train.steps, "must be >= 1")
    _require(train.batch_size >= 1, "train.batch_size", train.batch_size, "must be >= 1")
    _require(
        train.batch_size % device_count == 0,
        "train.batch_size",
        train.batch_size,
        f"must be divisible by the number of devices ({device_count})",
    )
    _require(
        math.isfinite(train.learning_rate) and train.learning_rate > 0,
        "train.learning_rate",
        train.learning_rate,
        "must be finite and > 0",
    )
    _require(
        0 <= train.final_lr_fraction <= 1,
        "train.final_lr_fraction",
        train.final_lr_fraction,
        "must be in [0, 1]",
    )
    _require(train.schedule in SCHEDULES, "train.schedule", train.schedule, f"one of {SCHEDULES}")
    _require(
        0 <= train.warmup_steps < train.steps or train.schedule == "constant",
        "train.warmup_steps",
        train.warmup_steps,
        "must be smaller than train.steps",
    )
    _require(
        train.checkpoint_every >= 1,
        "train.checkpoint_every",
        train.checkpoint_every,
        "must be >= 1",
    )
    _require(
        train.keep_checkpoints >= 1,
        "train.keep_checkpoints",
        train.keep_checkpoints,
        "must be >= 1",
    )
    _require(train.log_every >= 1, "train.log_every", train.log_every, "must be >= 1")
    _require(0 <= train.ema_decay < 1, "train.ema_decay", train.ema_decay, "must be in [0, 1)")
    _require(data.num_val_cases >= 0, "data.num_val_cases", data.num_val_cases, "must be >= 0")
    _require(
        data.centre_sampling in CENTRE_SAMPLING,
        "data.centre_sampling",
        data.centre_sampling,
        f"one of {CENTRE_SAMPLING}",
    )
    _require(data.worker_count >= 0, "data.worker_count", data.worker_count, "must be >= 0")
    _require(data.intensity_std > 0, "data.intensity_std", data.intensity_std, "must be > 0")
    clip = tuple(data.intensity_clip)
    _require(
        len(clip) == 2 and all(math.isfinite(v) for v in clip) and clip[0] < clip[1],
        "data.intensity_clip",
        data.intensity_clip,
        "must be (low, high) in HU with low < high",
    )
    for name in AUGMENT_PROBABILITIES:
        value = config.augment[name]
        _require(0 <= value <= 1, f"augment.{name}", value, "must be a probability in [0, 1]")
    augment = config.augment
    _require(
        augment.device in AUGMENT_DEVICES,
        "augment.device",
        augment.device,
        f"one of {AUGMENT_DEVICES}",
    )
    _require(augment.scale < 1, "augment.scale", augment.scale, "must be < 1 (zoom by 1 - scale)")
    every = config.eval.every
    _require(
        isinstance(every, int) and every >= 0,
        "eval.every",
        every,
        "must be an integer >= 0 (0: no validation during training)",
    )
    num_cases = config.eval.num_cases
    _require(
        isinstance(num_cases, int) and num_cases >= 1,
        "eval.num_cases",
        num_cases,
        "must be an integer >= 1",
    )
    tolerance = config.eval.nsd_tolerance_mm
    _require(
        math.isfinite(tolerance) and tolerance > 0,
        "eval.nsd_tolerance_mm",
        tolerance,
        "must be a distance > 0 in mm",
    )
    _check_preprocessing(data, model.num_classes)


def _check_level_steps(config: ml_collections.ConfigDict) -> None:
    pyramid, steps = config.pyramid, config.train.steps
    lengths = tuple(pyramid.get("level_steps", ()))
    if pyramid.mode != "separate" or pyramid.levels < 2 or not isinstance(steps, int):
        return
    if not lengths:
        _require(
            steps >= pyramid.levels,
            "train.steps",
            steps,
            f"a separately trained pyramid needs at least one step per level ({pyramid.levels})",
        )
        return
    _require(
        len(lengths) == pyramid.levels - 1
        and all(isinstance(n, int) and n >= 1 for n in lengths)
        and sum(lengths) < steps,
        "pyramid.level_steps",
        pyramid.level_steps,
        f"() or {pyramid.levels - 1} positive step counts, one per level but the finest, "
        f"summing to less than train.steps={steps}",
    )


def _check_context_options(pyramid: ml_collections.ConfigDict) -> None:
    rate = pyramid.get("context_dropout", 0.0)
    _require(
        isinstance(rate, int | float) and 0.0 <= rate < 1.0,
        "pyramid.context_dropout",
        rate,
        "must be a probability from 0 (the paper) up to, not including, 1",
    )
    weights = tuple(pyramid.get("level_loss_weights", ()))
    if not weights:
        return
    _require(
        len(weights) == pyramid.levels
        and all(isinstance(w, int | float) and math.isfinite(w) and w >= 0 for w in weights)
        and sum(weights) > 0,
        "pyramid.level_loss_weights",
        pyramid.level_loss_weights,
        f"() or {pyramid.levels} weights >= 0, one per level (coarsest first), not all 0",
    )


def _check_preprocessing(data: ml_collections.ConfigDict, num_classes: int) -> None:
    _require(
        data.normalization in NORMALIZATIONS,
        "data.normalization",
        data.normalization,
        f"one of {NORMALIZATIONS}",
    )
    _require(
        data.label_interpolation in LABEL_INTERPOLATIONS,
        "data.label_interpolation",
        data.label_interpolation,
        f"one of {LABEL_INTERPOLATIONS}",
    )
    _require(
        data.image_interpolation_order in (1, 3),
        "data.image_interpolation_order",
        data.image_interpolation_order,
        "1 (linear) or 3 (cubic)",
    )
    _require(
        data.unmapped_labels in UNMAPPED_LABELS,
        "data.unmapped_labels",
        data.unmapped_labels,
        f"one of {UNMAPPED_LABELS}",
    )
    weights = tuple(data.class_sampling_weights)
    _require(
        weights == () or (len(weights) == num_classes and all(w >= 0 for w in weights)),
        "data.class_sampling_weights",
        data.class_sampling_weights,
        f"() for uniform, or {num_classes} non-negative weights, one per model class",
    )
    spacing = tuple(data.target_spacing)
    _require(
        spacing == () or (len(spacing) == 3 and all(s > 0 for s in spacing)),
        "data.target_spacing",
        data.target_spacing,
        "() for the median spacing, or three positive sizes in mm",
    )
    for pair in data.label_map:
        _require(
            len(pair) == 2 and pair[0] >= 0 and 0 <= pair[1] < num_classes,
            "data.label_map",
            pair,
            f"pairs (dataset id >= 0, model class in 0..{num_classes - 1})",
        )
    _require(
        data.preprocess_workers >= 0,
        "data.preprocess_workers",
        data.preprocess_workers,
        "must be >= 0",
    )
