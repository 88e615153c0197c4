"""Every config field, declared once: its default, allowed values, meaning and check.

`default_config()` is configs/default.py; `validate_config` refuses a bad value (or an
unknown or missing field) with a message naming the field; `migrate` gives a run saved
before a field existed the value it trained with; `help_lines` and `markdown_table` are
`autocontext train --help`'s field listing and the table of docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections

# A field an older run may lack gets `older`; one without it was in every saved run.
_REQUIRED = object()
MAX_PYRAMID_LEVELS = 4
SECTIONS = ("data", "model", "pyramid", "loss", "augment", "train", "eval")


class ConfigError(ValueError):
    """A configuration field has a value the run cannot use."""


Check = Callable[[Any, ml_collections.ConfigDict], bool]
Why = str | Callable[[ml_collections.ConfigDict], str]


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: `check(value, config)` must hold, else `why` is the message."""

    name: str
    default: Any
    meaning: str
    choices: tuple = ()
    check: Check | None = None
    why: Why = ""
    older: Any = _REQUIRED

    @property
    def kind(self) -> str:
        """The field's type as the docs and --help write it."""
        if isinstance(self.default, bool):
            return "bool"
        if isinstance(self.default, tuple):
            return "tuple"
        return type(self.default).__name__

    def reason(self, config: ml_collections.ConfigDict) -> str:
        """What the field's value must be, for the message that refuses it."""
        if self.choices:
            return f"one of {self.choices}"
        return self.why(config) if callable(self.why) else self.why


def _at_least(low: float) -> Check:
    return lambda value, _: value >= low


def _probability(value: Any, _: Any) -> bool:
    return 0 <= value <= 1


def _non_negative_int(value: Any, _: Any) -> bool:
    return isinstance(value, int) and value >= 0


def _crop_size(value: Any, config: ml_collections.ConfigDict) -> bool:
    return isinstance(value, int) and value > 0 and value % 2**config.model.num_poolings == 0


def _fold(value: Any, config: ml_collections.ConfigDict) -> bool:
    return isinstance(value, int) and (value == -1 or 0 <= value < config.data.num_folds)


def _intensity_clip(value: Any, _: Any) -> bool:
    clip = tuple(value)
    return len(clip) == 2 and all(math.isfinite(v) for v in clip) and clip[0] < clip[1]


def _class_sampling_weights(value: Any, config: ml_collections.ConfigDict) -> bool:
    weights = tuple(value)
    return weights == () or (
        len(weights) == config.model.num_classes and all(w >= 0 for w in weights)
    )


def _target_spacing(value: Any, _: Any) -> bool:
    spacing = tuple(value)
    return spacing == () or (len(spacing) == 3 and all(s > 0 for s in spacing))


def _label_map(value: Any, config: ml_collections.ConfigDict) -> bool:
    classes = config.model.num_classes
    return all(len(pair) == 2 and pair[0] >= 0 and 0 <= pair[1] < classes for pair in value)


def _level_steps(value: Any, config: ml_collections.ConfigDict) -> bool:
    pyramid, steps = config.pyramid, config.train.steps
    lengths = tuple(value)
    if pyramid.mode != "separate" or pyramid.levels < 2 or not isinstance(steps, int):
        return True
    if not lengths:
        return True  # train.steps's own check asks for a step per level
    return (
        len(lengths) == pyramid.levels - 1
        and all(isinstance(n, int) and n >= 1 for n in lengths)
        and sum(lengths) < steps
    )


def _level_loss_weights(value: Any, config: ml_collections.ConfigDict) -> bool:
    weights = tuple(value)
    return not weights or (
        len(weights) == config.pyramid.levels
        and all(isinstance(w, int | float) and math.isfinite(w) and w >= 0 for w in weights)
        and sum(weights) > 0
    )


def _train_steps(value: Any, config: ml_collections.ConfigDict) -> bool:
    pyramid = config.pyramid
    separate = pyramid.mode == "separate" and pyramid.levels >= 2
    if separate and not tuple(pyramid.level_steps):
        return isinstance(value, int) and value >= pyramid.levels
    return isinstance(value, int) and value >= 1


def _train_steps_why(config: ml_collections.ConfigDict) -> str:
    pyramid = config.pyramid
    if pyramid.mode == "separate" and pyramid.levels >= 2 and not tuple(pyramid.level_steps):
        return f"a separately trained pyramid needs at least one step per level ({pyramid.levels})"
    return "must be >= 1"


def _warmup(value: Any, config: ml_collections.ConfigDict) -> bool:
    return config.train.schedule == "constant" or 0 <= value < config.train.steps


FIELDS: tuple[Field, ...] = (
    Field("seed", 0, "Seed of the parameters' initialisation and of the training rng."),
    # data
    Field(
        "data.dir",
        "data/phantom",
        "A folder in the MSD/nnU-Net layout (dataset.json, imagesTr/, labelsTr/), or, when "
        "`pairs` is set, the folder its relative paths start from.",
    ),
    Field("data.pairs", (), "((image, label), ...) relative to `dir`; () = the MSD layout."),
    Field(
        "data.label_map",
        (),
        "((dataset id, model class), ...): unmapped ids become background, or an error with "
        "unmapped_labels = error. () = the dataset's ids are the model's classes.",
        check=_label_map,
        why=lambda c: f"pairs (dataset id >= 0, model class in 0..{c.model.num_classes - 1})",
        older=(),
    ),
    Field(
        "data.unmapped_labels",
        "background",
        "What a dataset id missing from `label_map` becomes.",
        choices=("background", "error"),
        older="background",
    ),
    Field(
        "data.skip_bad_cases",
        False,
        "Leave out a bad case with a warning naming it, instead of stopping.",
    ),
    Field(
        "data.cache_dir",
        "",
        'Preprocessed cases; "" = the dataset folder\'s name + "_preprocessed", beside it.',
    ),
    Field(
        "data.preprocess_workers",
        2,
        "Processes that preprocess cases into the cache.",
        check=_at_least(0),
        why="must be >= 0",
    ),
    Field(
        "data.target_spacing",
        (),
        "Voxel size (mm, along R, A, S) every case is resampled to; () = the median of the "
        "training cases (nnU-Net).",
        check=_target_spacing,
        why="() for the median spacing, or three positive sizes in mm",
    ),
    Field(
        "data.image_interpolation_order",
        1,
        "Spline order of the image's resampling: 1 (linear) or 3 (cubic).",
        check=lambda value, _: value in (1, 3),
        why="1 (linear) or 3 (cubic)",
    ),
    Field(
        "data.label_interpolation",
        "linear_argmax",
        "Labels' resampling: linear_argmax (per class, keeps thin vessels) or nearest.",
        choices=("linear_argmax", "nearest"),
    ),
    Field(
        "data.generate_phantom",
        False,
        "Generate the phantom into a missing or empty `dir` other than data/phantom (where it "
        "is always generated), so a misspelt `dir` is an error rather than a phantom.",
        older=False,
    ),
    Field(
        "data.phantom_cases",
        30,
        "How many phantom cases to generate when the phantom is generated.",
        check=_at_least(0),
        why="must be >= 0",
    ),
    Field(
        "data.num_val_cases",
        6,
        "Held-out cases, left out of training and evaluated at its end.",
        check=_at_least(0),
        why="must be >= 0",
    ),
    Field(
        "data.split_seed",
        0,
        "Seed of the held-out split and of the folds, apart from `seed`, so runs of several "
        "seeds share them.",
    ),
    Field(
        "data.num_folds",
        5,
        "Folds of the cross-validation that `fold` picks from: every case of the dataset in "
        "exactly one, written once to the cache's folds.json that every run on it shares.",
        check=lambda value, _: isinstance(value, int) and value >= 2,
        why="must be an integer >= 2",
        older=5,
    ),
    Field(
        "data.fold",
        -1,
        "The held-out fold of a cross-validated run, 0 .. num_folds-1 (num_val_cases is then "
        "unused, and the plan is made from every case, as nnU-Net's); -1 = the held-out split "
        "of num_val_cases cases by split_seed.",
        check=_fold,
        why=lambda c: (
            f"-1 (no folds), or a fold from 0 to data.num_folds - 1 = {c.data.num_folds - 1}"
        ),
        older=-1,
    ),
    Field(
        "data.centre_sampling",
        "class_balanced",
        "Crop centres: a uniform foreground voxel (foreground, the paper), or a voxel of a "
        "class drawn uniformly among those present (class_balanced: small structures too).",
        choices=("foreground", "class_balanced"),
    ),
    Field(
        "data.class_sampling_weights",
        (),
        "class_balanced only: one weight per model class (index 0 unused) to oversample some "
        "structures, e.g. (0, 2, 2, 1, 1, 1, 1, 2); () = uniform.",
        check=_class_sampling_weights,
        why=lambda c: (
            f"() for uniform, or {c.model.num_classes} non-negative weights, one per model class"
        ),
    ),
    Field(
        "data.crop_size",
        24,
        "Edge of the cubic crop, in voxels, that every pyramid level sees.",
        check=_crop_size,
        why=lambda c: (
            f"must be a positive multiple of 2^model.num_poolings = {2**c.model.num_poolings}"
        ),
    ),
    Field(
        "data.normalization",
        "window",
        "window: the fixed Hounsfield window, then (HU - mean) / std. foreground_zscore: "
        "nnU-Net's CT scheme, percentiles and moments of the training foreground.",
        choices=("window", "foreground_zscore"),
    ),
    Field(
        "data.intensity_clip",
        (-1000.0, 1000.0),
        "The window's (low, high) in HU.",
        check=_intensity_clip,
        why="must be (low, high) in HU with low < high",
    ),
    Field("data.intensity_mean", 40.0, "The window's mean, in HU."),
    Field(
        "data.intensity_std",
        200.0,
        "The window's std, in HU.",
        check=lambda value, _: value > 0,
        why="must be > 0",
    ),
    Field("data.pad_value_hu", -1000.0, "Intensity of everything outside the scan (air)."),
    Field(
        "data.worker_count",
        0,
        "Grain worker processes (0 = in the training process).",
        check=_at_least(0),
        why="must be >= 0",
    ),
    Field("data.num_threads", 2, "Grain reader threads."),
    # model
    Field(
        "model.width",
        8,
        "Channels of the U-Net's first level.",
        check=_at_least(1),
        why="must be positive",
    ),
    Field(
        "model.num_poolings",
        3,
        "Poolings of each U-Net (its depth).",
        check=_at_least(1),
        why="must be >= 1",
    ),
    Field("model.in_channels", 1, "Image channels.", check=_at_least(1), why="must be >= 1"),
    Field(
        "model.num_classes",
        8,
        "Classes K, background included.",
        check=_at_least(2),
        why="must be >= 2",
    ),
    Field(
        "model.compute_dtype",
        "float32",
        "Dtype of the activations (parameters stay float32).",
        choices=("float32", "bfloat16"),
    ),
    Field("model.bn_momentum", 0.9, "Momentum of BatchNorm's running statistics."),
    Field(
        "model.conv_impl",
        "auto",
        "Lowering of the 3x3x3 convolution: native, depth_folded or folded, compiled on CPU "
        "without YNNPACK, or with it (XLA's default) as NAME_ynnpack; auto: on CPU the six "
        "timed once per host and shapes and the choice cached with the compilation cache, "
        "depth_folded kept unless another is over 3x faster (runtime/autotune.py); native "
        "on GPU/TPU. All compute the same function (models/conv.py).",
        choices=(
            "auto",
            "native",
            "depth_folded",
            "folded",
            "native_ynnpack",
            "depth_folded_ynnpack",
            "folded_ynnpack",
        ),
        older="auto",
    ),
    # pyramid
    Field(
        "pyramid.levels",
        2,
        "Levels S of the pyramid; 1 is one U-Net.",
        check=lambda value, _: isinstance(value, int) and 1 <= value <= MAX_PYRAMID_LEVELS,
        why=f"must be an integer from 1 to {MAX_PYRAMID_LEVELS}",
    ),
    Field(
        "pyramid.mode",
        "end_to_end",
        "end_to_end (one summed loss, gradients through the context) | stagewise (one summed "
        "loss, the context through stop_gradient) | separate (level 1 trained first, then "
        "frozen while level 2 trains on its inference-mode predictions, ...) | none (no "
        "context).",
        choices=("end_to_end", "stagewise", "separate", "none"),
    ),
    Field(
        "pyramid.level_steps",
        (),
        "separate only: the steps of levels 1 .. S-1 in turn, the finest training the rest of "
        "train.steps; () splits train.steps equally between the levels.",
        check=_level_steps,
        why=lambda c: (
            f"() or {c.pyramid.levels - 1} positive step counts, one per level but "
            f"the finest, summing to less than train.steps={c.train.steps}"
        ),
        older=(),
    ),
    Field(
        "pyramid.context_dropout",
        0.0,
        "In training, each example's context is replaced by the uniform 1/K with this "
        "probability. 0: the paper's (0.2 measured worse: docs/ablation.md).",
        check=lambda value, _: isinstance(value, int | float) and 0.0 <= value < 1.0,
        why="must be a probability from 0 (the paper) up to, not including, 1",
        older=0.0,
    ),
    Field(
        "pyramid.level_loss_weights",
        (),
        "Weight of each level's loss in the summed loss of end_to_end and stagewise, coarsest "
        "first; () = 1 for every level (the paper; (2, 1) measured: docs/ablation.md).",
        check=_level_loss_weights,
        why=lambda c: (
            f"() or {c.pyramid.levels} weights >= 0, one per level (coarsest first), not all 0"
        ),
        older=(),
    ),
    # loss
    Field(
        "loss.name",
        "dice_ce",
        "dice (the paper's Eq. 1) or dice_ce (Dice plus cross-entropy).",
        choices=("dice", "dice_ce"),
    ),
    Field(
        "loss.dice_background",
        True,
        "Average the Dice over all K classes (the paper) or over the K-1 structures only.",
    ),
    # augment
    Field(
        "augment.probability",
        0.5,
        "Each intensity augmentation (on the device, per example) applies with this.",
        check=_probability,
        why="must be a probability in [0, 1]",
    ),
    Field("augment.intensity_scale", 0.05, "Multiply by U(1 - a, 1 + a)."),
    Field("augment.intensity_shift", 0.05, "Add U(-b, b), in normalised units."),
    Field("augment.noise_std", 0.05, "Add N(0, U(0, s)^2) noise."),
    Field("augment.gamma", 0.1, "Gamma exp(U(-g, g)) on each example's intensity range."),
    Field(
        "augment.rotation_probability",
        0.0,
        "Spatial augmentation (one transform per example, one resampling of the region the "
        "coarsest level sees): rotation's probability. Spatial parts are off by default: the "
        "phantom varies more, and on a CPU the warp costs as much as the step.",
        check=_probability,
        why="must be a probability in [0, 1]",
    ),
    Field("augment.rotation_degrees", 10.0, "Rotation about each axis, U(-a, a) degrees."),
    Field(
        "augment.scale_probability",
        0.0,
        "Probability of the zoom.",
        check=_probability,
        why="must be a probability in [0, 1]",
    ),
    Field(
        "augment.scale",
        0.1,
        "Zoom by U(1 - a, 1 + a).",
        check=lambda value, _: value < 1,
        why="must be < 1 (zoom by 1 - scale)",
    ),
    Field(
        "augment.translation_probability",
        0.0,
        "Probability of the shift.",
        check=_probability,
        why="must be a probability in [0, 1]",
    ),
    Field("augment.translation_voxels", 4.0, "Shift the centre by U(-a, a) native voxels."),
    Field(
        "augment.elastic_probability",
        0.0,
        "Probability of the elastic deformation.",
        check=_probability,
        why="must be a probability in [0, 1]",
    ),
    Field("augment.elastic_voxels", 2.0, "Std of the elastic control points' displacements."),
    Field("augment.elastic_control_points", 4, "Elastic control points per axis."),
    Field(
        "augment.device",
        "auto",
        "Where the spatial warp runs: host (the Grain workers), device (the jitted step), or "
        "auto: device on GPU/TPU when any spatial part is on, host on a CPU.",
        choices=("auto", "host", "device"),
    ),
    # train
    Field("train.steps", 1500, "Training steps.", check=_train_steps, why=_train_steps_why),
    Field(
        "train.batch_size",
        2,
        "Global batch, split over the devices.",
        check=_at_least(1),
        why="must be >= 1",
    ),
    Field(
        "train.learning_rate",
        6e-3,
        "Adam's peak learning rate.",
        check=lambda value, _: math.isfinite(value) and value > 0,
        why="must be finite and > 0",
    ),
    Field(
        "train.schedule",
        "cosine",
        "constant, or cosine (linear warm-up, then cosine decay to final_lr_fraction).",
        choices=("constant", "cosine"),
    ),
    Field(
        "train.warmup_steps",
        20,
        "Linear warm-up steps of the cosine schedule.",
        check=_warmup,
        why="must be smaller than train.steps",
    ),
    Field(
        "train.final_lr_fraction",
        0.05,
        "The cosine schedule's last learning rate, as a fraction of the peak.",
        check=_probability,
        why="must be in [0, 1]",
    ),
    Field(
        "train.ema_decay",
        0.99,
        "Evaluate an exponential moving average of the parameters (0: the last parameters).",
        check=lambda value, _: 0 <= value < 1,
        why="must be in [0, 1)",
    ),
    Field(
        "train.checkpoint_every",
        100,
        "Steps between checkpoints.",
        check=_at_least(1),
        why="must be >= 1",
    ),
    Field(
        "train.keep_checkpoints",
        3,
        "Checkpoints kept.",
        check=_at_least(1),
        why="must be >= 1",
    ),
    Field(
        "train.log_every", 10, "Steps between log lines.", check=_at_least(1), why="must be >= 1"
    ),
    # eval
    Field("eval.at_end", True, "Evaluate the held-out cases at the end of training."),
    Field(
        "eval.every",
        300,
        "Validation during training every this many steps (0: never): the finest level's Dice "
        "on the first `num_cases` held-out cases, segmented as `predict` does (about 6 s per "
        "default phantom case on a 2-core CPU).",
        check=_non_negative_int,
        why="must be an integer >= 0 (0: no validation during training)",
    ),
    Field(
        "eval.num_cases",
        1,
        "Held-out cases of each validation during training.",
        check=lambda value, _: isinstance(value, int) and value >= 1,
        why="must be an integer >= 1",
    ),
    Field(
        "eval.nsd_tolerance_mm",
        2.0,
        "Normalised surface Dice counts surface voxels within this distance of the other surface.",
        check=lambda value, _: math.isfinite(value) and value > 0,
        why="must be a distance > 0 in mm",
        older=2.0,
    ),
)

_BY_NAME = {field.name: field for field in FIELDS}


def default(name: str) -> Any:
    """The default value of the field called `name`."""
    return _BY_NAME[name].default


def choices(name: str) -> tuple:
    """The allowed values of the field called `name`."""
    return _BY_NAME[name].choices


def default_config() -> ml_collections.ConfigDict:
    """A config with every field at its default: configs/default.py."""
    config = ml_collections.ConfigDict()
    for section in SECTIONS:
        config[section] = ml_collections.ConfigDict()
    for spec in FIELDS:
        _set(config, spec.name, spec.default)
    return config


def _set(config: ml_collections.ConfigDict, name: str, value: Any) -> None:
    *sections, leaf = name.split(".")
    for section in sections:
        config = config[section]
    config[leaf] = value


def _get(config: ml_collections.ConfigDict, name: str) -> Any:
    for part in name.split("."):
        config = config[part]
    return config


def _has(config: ml_collections.ConfigDict, name: str) -> bool:
    for part in name.split("."):
        if not isinstance(config, ml_collections.ConfigDict | dict) or part not in config:
            return False
        config = config[part]
    return True


def _leaf_names(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and name in SECTIONS:
            yield from _leaf_names(value, f"{name}.")
        else:
            yield name


def migrate(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, list[str]]:
    """An older run's config with every field it predates at the value it trained with.

    Returns the migrated copy and the names of the fields that were added. A field that
    every saved run has (no `older` value) and that is missing is a ConfigError.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    added = []
    for spec in FIELDS:
        if _has(config, spec.name):
            continue
        if spec.older is _REQUIRED:
            raise ConfigError(f"config.{spec.name}: missing from the run's saved config")
        *sections, _ = spec.name.split(".")
        if sections and sections[0] not in config:
            config[sections[0]] = ml_collections.ConfigDict()
        _set(config, spec.name, spec.older)
        added.append(spec.name)
    return config, added


def _check_type(spec: Field, value: Any) -> bool:
    expected = spec.default
    if isinstance(expected, bool):
        return isinstance(value, bool)
    if isinstance(expected, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(expected, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(expected, tuple):
        return isinstance(value, tuple | list)
    return isinstance(value, type(expected))


def validate_config(config: ml_collections.ConfigDict, device_count: int) -> None:
    """Raise ConfigError naming the first field that is unknown, missing or cannot work."""
    for name in _leaf_names(config):
        if name not in _BY_NAME:
            close = difflib.get_close_matches(name, _BY_NAME, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(
                f"config.{name}: not a field of the schema (docs/configuration.md lists them){hint}"
            )
    for spec in FIELDS:
        if not _has(config, spec.name):
            raise ConfigError(
                f"config.{spec.name}: missing (a config built on configs/default.py has "
                "every field)"
            )
    for spec in FIELDS:
        value = _get(config, spec.name)
        if not _check_type(spec, value):
            raise ConfigError(f"config.{spec.name}={value!r}: must be of type {spec.kind}")
        ok = (
            value in spec.choices
            if spec.choices
            else spec.check is None or spec.check(value, config)
        )
        if not ok:
            raise ConfigError(f"config.{spec.name}={value!r}: {spec.reason(config)}")
    batch = config.train.batch_size
    if batch % device_count:
        raise ConfigError(
            f"config.train.batch_size={batch!r}: must be divisible by the number of devices "
            f"({device_count})"
        )


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


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def help_lines() -> list[str]:
    """`autocontext train --help`'s listing: one line per field, its default and meaning."""
    lines = ["Config fields (default: meaning; docs/configuration.md has the allowed values):"]
    for spec in FIELDS:
        lines.append(
            textwrap.fill(
                f"{spec.name} = {_shown(spec.default)}: {spec.meaning}",
                96,
                initial_indent="  ",
                subsequent_indent="      ",
            )
        )
    return lines


def allowed_text(spec: Field) -> str:
    """The allowed values of a field in words, as the docs table shows them."""
    if spec.choices:
        return ", ".join(f"`{choice}`" for choice in spec.choices)
    if spec.check is None:
        return ""
    return spec.why(default_config()) if callable(spec.why) else spec.why


def markdown_table() -> str:
    """The field table of docs/configuration.md, generated from the schema."""
    rows = [
        "| field | type | default | allowed | older runs get | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for spec in FIELDS:
        older = "(always saved)" if spec.older is _REQUIRED else f"`{_shown(spec.older)}`"
        cells = [
            f"`{spec.name}`",
            spec.kind,
            f"`{_shown(spec.default)}`",
            allowed_text(spec),
            older,
            spec.meaning,
        ]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"
