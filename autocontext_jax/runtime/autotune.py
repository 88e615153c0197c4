"""`model.conv_impl=auto`: the convolution's lowering for this host, timed once and cached.

As cuDNN's autotuning does for a GPU's convolutions, the first start of a run's shapes on a
CPU host times every named lowering of the 3x3x3 convolution (models/conv.py: native,
depth_folded and folded, each compiled with YNNPACK off and on), keeps the choice in
CACHE_FILE in the compilation cache folder (`--compilation_cache`), and every later start
with the same key reads it instead of timing again. A named `model.conv_impl` is never
timed. The saved config keeps `auto`; the start block and environment.jsonl say what it
resolved to, and the model is built with that name (`build_pyramid(config, conv_impl)`).

What is timed, for the shapes of the run: forward and backward (input and kernel
gradients) of one 3x3x3 convolution per U-Net level, the one with the most multiply-adds
there (`models.unet.conv_channels`), at the crop halved per level, with the channels of the
finest pyramid level, the compute dtype and the batch per device; the finest U-Net levels
only, as many as hold COVERAGE of the multiply-adds (one at the shipped configs), since
compiling is most of the cost.
A layer costing more than SLICE_BUDGET multiply-adds is cut to one example of fewer depth
slices (never under MIN_SLICES): the folded lowerings' 2D convolutions keep their
(H, W, C, O) and only run fewer times, which keeps the paper crop's timing near the
default's. Not the whole train step: compiling the paper's step takes minutes, six of them
more.

How: each candidate compiled, then run once (a warm-up that also drops every candidate
over DROP_RATIO x the fastest, which cannot win), then ROUNDS rounds of the rest,
interleaved in a rotating order so that a machine whose load changes treats them alike;
a candidate's time is its median. The untimed default (`conv.untimed_default`) is kept
unless it takes more than SWITCH_RATIO times the fastest candidate's time: one layer
compiled alone ranks lowerings that are near each other in the train step unreliably
(on the 2-core development CPU, idle, three timings of the default config's shapes put
`folded` 1.25x, 1.44x and 1.92x ahead of `depth_folded`, while the default config's step
ran 1.03x faster with it and its pyramid step 1.07x slower; docs/performance.md), and
another lowering rounds the same function differently. So the timing guards against a
default that is far off on a host (XLA's own 3D convolution ran 3-10x slower than the
folds on that CPU; on another host or XLA version it may not), not against a few per cent.

The key of a choice is everything that changes the answer: the CPU (model, family, vector
extensions), the cores this process may use, the backend, the jax and jaxlib versions,
XLA_FLAGS, the timed layers, the dtype and the candidates. One file holds many keys, so a
home folder shared by hosts keeps one choice per CPU. An unreadable file is timed over and
rewritten, in one line. With no cache folder ('') nothing is timed and `auto` is the
untimed default, so a start without persistent state does not pay the timing each time.
GPUs and TPUs are not timed either: they run the native convolution (cuDNN, the TPU's
convolution unit), which every measurement there used (docs/performance.md); the folds
were written for XLA's CPU backend, and accelerator time is worth more than finding out.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import pathlib
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from autocontext_jax.data.atomic import write_json_atomically
from autocontext_jax.models import COMPUTE_DTYPES, build_pyramid, conv
from autocontext_jax.models.unet import conv_channels
from autocontext_jax.runtime import environment

CACHE_FILE = "conv_lowering.json"
# Part of every key: raise it when a lowering or the timed program changes, so that older
# choices are timed again.
CACHE_FORMAT = 1
# Multiply-adds of one timed layer's forward pass above which its depth slices are cut.
SLICE_BUDGET = 2**30
MIN_SLICES = 4
# The timed levels hold this share of the U-Net's convolution multiply-adds. Each coarser
# level holds about half the one before, so this times the finest level alone (55-57 % at
# the default and paper sizes): compiling the six candidates is most of the time (3.6 s
# of CPU for one layer on the 2-core CPU, twice that for two), and the default config's
# train steps ranked YNNPACK on against off, and the folds against native, as its finest
# layer did (docs/performance.md).
COVERAGE = 0.5
ROUNDS = 5
DROP_RATIO = 1.5
# The untimed default stays unless it is slower than the fastest candidate by more than
# this factor (module docstring: between lowerings within 7 % of each other in the train
# step, the timing's ratio reached 1.92x idle and 1.95x on a loaded machine, on the
# development CPU; 2 was set first, and a timing at 1.92 came too close to it).
SWITCH_RATIO = 3.0

# (batch, depth, height, width, input channels, output channels) of one timed convolution.
Layer = tuple[int, int, int, int, int, int]
# (candidates, layers, dtype) -> each candidate's seconds for the layers' forward+backward.
Measure = Callable[[Sequence[str], Sequence[Layer], str], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class Lowering:
    """What `model.conv_impl` resolved to on this host, and how it was chosen.

    `how` is `named` (the config names it), `backend` (GPU/TPU: native, not timed),
    `untimed` (no cache folder: the untimed default), `timed` (timed now) or `cached`
    (read from `cache_file`). `seconds` holds each candidate's timing when there is one.
    """

    conv_impl: str
    how: str
    seconds: Mapping[str, float] = dataclasses.field(default_factory=dict)
    timing_seconds: float = 0.0
    cache_file: str = ""
    timed_at: str = ""

    def describe(self) -> str:
        """One line for the start block: the lowering, how it was chosen, against the others."""
        name = _label(self.conv_impl)
        if self.how == "named":
            return f"{name}, as model.conv_impl names it"
        if self.how == "backend":
            return f"{name} (auto on {jax.default_backend()}: not timed)"
        if self.how == "untimed":
            return f"{name} (auto, untimed default: no compilation cache to keep a timing in)"
        reference = self.seconds.get(self.conv_impl)
        others = ", ".join(
            f"{impl} x{self.seconds[impl] / reference:.2f}"
            for impl in sorted(self.seconds, key=self.seconds.get)
            if impl != self.conv_impl and reference
        )
        if self.how == "timed":
            where = f"timed on this host in {self.timing_seconds:.1f} s, kept in {self.cache_file}"
        else:
            where = f"this host's choice of {self.timed_at}, read from {self.cache_file}"
        return f"{name} (auto: {where}; time of the others: {others})"

    def record(self) -> dict[str, Any]:
        """The fields environment.jsonl keeps: the lowering, how it was chosen, its timings."""
        return {
            "conv_impl": self.conv_impl,
            "conv_impl_how": self.how,
            "conv_impl_seconds": dict(self.seconds),
        }


def _label(impl: str) -> str:
    """`impl`, with its YNNPACK setting spelled out where there is one (on CPU)."""
    if jax.default_backend() != "cpu":
        return impl
    return f"{impl} (YNNPACK {'on' if impl.endswith(conv.YNNPACK_SUFFIX) else 'off'})"


def probe_layers(config: ml_collections.ConfigDict, device_count: int) -> tuple[Layer, ...]:
    """The convolutions timed for `config`: one per timed U-Net level (module docstring)."""
    batch = max(1, config.train.batch_size // device_count)
    model = build_pyramid(config)
    in_channels = model.level_in_channels(model.num_levels)
    widest: dict[int, tuple[int, int]] = {}
    level_macs = [0] * (model.num_poolings + 1)
    for level, inputs, outputs in conv_channels(in_channels, model.width, model.num_poolings):
        level_macs[level] += (config.data.crop_size // 2**level) ** 3 * inputs * outputs
        if inputs * outputs > math.prod(widest.get(level, (0, 0))):
            widest[level] = (inputs, outputs)
    layers = []
    for level, (inputs, outputs) in sorted(widest.items()):
        # The finest levels, as many as hold COVERAGE of the multiply-adds.
        if sum(level_macs[:level]) >= COVERAGE * sum(level_macs):
            break
        size = config.data.crop_size // 2**level
        per_slice = size * size * 27 * inputs * outputs
        if batch * size * per_slice <= SLICE_BUDGET:
            layers.append((batch, size, size, size, inputs, outputs))
        else:
            depth = min(size, max(MIN_SLICES, SLICE_BUDGET // per_slice))
            layers.append((1, depth, size, size, inputs, outputs))
    return tuple(layers)


def cache_key(layers: Sequence[Layer], dtype: str) -> dict[str, Any]:
    """Everything that changes which lowering is fastest, for the timed `layers` in `dtype`."""
    return {
        "format": CACHE_FORMAT,
        **environment.cpu_identity(),
        "cores": environment.usable_cores(),
        "backend": jax.default_backend(),
        "jax": environment.package_version("jax"),
        "jaxlib": environment.package_version("jaxlib"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "dtype": dtype,
        "layers": [list(layer) for layer in layers],
        "candidates": list(conv.NAMED_CONV_IMPLS),
    }


def key_id(key: Mapping[str, Any]) -> str:
    """A short digest of `key`, the name of its entry in the cache file."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def measure_candidates(
    candidates: Sequence[str], layers: Sequence[Layer], dtype: str
) -> dict[str, float]:
    """Each candidate's median seconds for forward+backward of `layers` (module docstring).

    A candidate dropped after the warm-up keeps its warm-up time.
    """
    array_dtype = COMPUTE_DTYPES[dtype]
    keys = iter(jax.random.split(jax.random.key(0), 3 * len(layers)))
    inputs, kernels, probes = [], [], []
    for batch, depth, height, width, channels, out_channels in layers:
        spatial = (batch, depth, height, width)
        kernel_shape = (3, 3, 3, channels, out_channels)
        inputs.append(jax.random.normal(next(keys), (*spatial, channels), array_dtype))
        kernels.append(jax.random.normal(next(keys), kernel_shape, array_dtype))
        probes.append(jax.random.normal(next(keys), (*spatial, out_channels), array_dtype))
    arguments = (inputs, kernels, probes)

    def program(impl: str) -> Callable:
        def loss(inputs, kernels, probes):
            return sum(
                jnp.vdot(conv.conv3d_same(x, kernel, impl), probe).astype(jnp.float32)
                for x, kernel, probe in zip(inputs, kernels, probes, strict=True)
            )

        gradient = jax.jit(jax.grad(loss, (0, 1)), compiler_options=conv.compiler_options(impl))
        return gradient.lower(*arguments).compile()

    compiled = {impl: program(impl) for impl in candidates}

    def seconds(impl: str) -> float:
        start = time.perf_counter()
        jax.block_until_ready(compiled[impl](*arguments))
        return time.perf_counter() - start

    warm = {impl: seconds(impl) for impl in candidates}
    kept = [impl for impl in candidates if warm[impl] <= DROP_RATIO * min(warm.values())]
    times: dict[str, list[float]] = {impl: [] for impl in kept}
    for round_index in range(ROUNDS):
        shift = round_index % len(kept)
        for impl in kept[shift:] + kept[:shift]:
            times[impl].append(seconds(impl))
    return {impl: statistics.median(times[impl]) if impl in times else warm[impl] for impl in warm}


def choose(seconds: Mapping[str, float], default: str) -> str:
    """The fastest candidate, unless `default` takes at most SWITCH_RATIO x its time (docstring)."""
    fastest = min(seconds, key=seconds.get)
    if default in seconds and seconds[default] <= SWITCH_RATIO * seconds[fastest]:
        return default
    return fastest


def _valid_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and entry.get("conv_impl") in conv.NAMED_CONV_IMPLS
        and isinstance(entry.get("seconds"), dict)
        and entry["conv_impl"] in entry["seconds"]
        and all(isinstance(value, int | float) for value in entry["seconds"].values())
    )


def read_cache(path: pathlib.Path) -> tuple[dict[str, Any], str | None]:
    """The entries of the cache file at `path` ({} if there is none), and a line if unreadable."""
    if not path.exists():
        return {}, None
    try:
        entries = json.loads(path.read_text())["choices"]
        if not isinstance(entries, dict):
            raise TypeError(f"choices is a {type(entries).__name__}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        return {}, f"{path}: unreadable ({type(error).__name__}: {error})"
    return entries, None


def _agree(choice: str) -> str:
    """Process 0's choice, on every process of the run: one program must run on them all."""
    if jax.process_count() == 1:
        return choice
    index = conv.NAMED_CONV_IMPLS.index(choice)
    return conv.NAMED_CONV_IMPLS[int(multihost_utils.broadcast_one_to_all(np.int32(index)))]


def resolve_lowering(
    config: ml_collections.ConfigDict,
    cache_folder: str | os.PathLike,
    device_count: int | None = None,
    measure: Measure = measure_candidates,
    say: Callable[[str], None] | None = None,
) -> Lowering:
    """What `config.model.conv_impl` stands for on this host (see the module docstring).

    `cache_folder` is the compilation cache's ('' = none: `auto` is not timed);
    `device_count` (default: JAX's) divides the batch; `measure` times the candidates; `say`
    gets the lines for the user: before timing, and about a cache file it cannot use.
    """
    say = say or (lambda _: None)
    asked = config.model.conv_impl
    backend = jax.default_backend()
    if asked != "auto":
        return Lowering(conv.resolve_conv_impl(asked), "named")
    if backend != "cpu":
        return Lowering(conv.untimed_default(backend), "backend")
    if not cache_folder:
        return Lowering(conv.untimed_default(backend), "untimed")
    layers = probe_layers(config, device_count or jax.device_count())
    key = cache_key(layers, config.model.compute_dtype)
    path = pathlib.Path(cache_folder) / CACHE_FILE
    entries, problem = read_cache(path)
    entry = entries.get(key_id(key))
    if _valid_entry(entry):
        choice = _agree(entry["conv_impl"])
        return Lowering(choice, "cached", entry["seconds"], 0.0, str(path), entry.get("timed", ""))
    if entry is not None:
        problem = f"{path}: its entry for these shapes on this host is unreadable"
    if problem:
        say(f"{problem}; timing the convolution's lowerings again and rewriting it ...")
    else:
        say(f"Timing the convolution's lowerings on this host, once (kept in {path}) ...")
    start = time.perf_counter()
    seconds = measure(conv.NAMED_CONV_IMPLS, layers, config.model.compute_dtype)
    took = time.perf_counter() - start
    choice = choose(seconds, conv.untimed_default(backend))
    timed = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    entry = {
        "key": key,
        "conv_impl": choice,
        "seconds": seconds,
        "timed": timed,
        "timing_seconds": round(took, 2),
    }
    # Read again just before writing: another process may have added its own host's choice.
    latest, _ = read_cache(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(path, {"choices": {**latest, key_id(key): entry}})
    except OSError as error:
        say(f"{path}: cannot keep the timing ({error}); the next start times again")
    return Lowering(_agree(choice), "timed", seconds, took, str(path), timed)
