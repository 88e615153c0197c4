"""Time the jitted train step against the matmul peak and against PyTorch, in one run.

    python benchmarks/train_step.py                       # default + paper, U-Net + pyramid
    python benchmarks/train_step.py --configs=default --impls=native,auto --torch=false
    python benchmarks/train_step.py --configs=paper --paper_batch=3 --dtype=bfloat16  # GPU
    python benchmarks/train_step.py --configs= --end_to_end=default  # the real loop only

For each config (`default`, `paper`) and scope (`unet`: one U-Net level; `pyramid`: all
levels) it prints the median seconds per step, voxels/s, the achieved GFLOP/s from the
analytic FLOPs of the network (models/flops.py, three forward passes per step), that as a
fraction of the float32 (or bfloat16) matmul peak measured in the same run, the compile
time, peak memory, and PyTorch's median for the same network, batch and loss (needs
`pip install torch`; see benchmarks/torch_reference.py). `--impls` times several lowerings
of the 3x3x3 convolution side by side (`native` is XLA's own 3D convolution).

Then, for each config of `--end_to_end` (default: those of `--configs`), the real loop on
a few phantom cases: the Grain pipeline (the config's workers and augmentation,
`augment.device` resolved as training does), the device prefetch and the step together,
as training/loop.py runs them. It prints end-to-end steps/s beside the bare step's (the
same compiled step on one of those batches, repeated) and the fraction of the time the
step waits for data, 1 - bare / end-to-end seconds per step.
"""

from __future__ import annotations

import gc
import importlib.util
import pathlib
import resource
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from autocontext_jax import phantom
from autocontext_jax.cli.common import COMPILATION_CACHE
from autocontext_jax.config.files import load_config_file
from autocontext_jax.data.augment import spatial_augmentation_on
from autocontext_jax.data.pipeline import train_batches
from autocontext_jax.models import build_pyramid
from autocontext_jax.models.conv import CONV_IMPLS
from autocontext_jax.models.flops import train_step_flops
from autocontext_jax.runtime import autotune, environment, parallel
from autocontext_jax.runtime.memory import keep_freed_memory
from autocontext_jax.training import loop
from autocontext_jax.training.state import create_train_state, make_optimizer
from autocontext_jax.training.step import jit_train_step, make_train_step

REPO = pathlib.Path(__file__).resolve().parents[1]

_CONFIGS = flags.DEFINE_list("configs", ["default", "paper"], "configs/NAME.py to time.")
_SCOPES = flags.DEFINE_list("scopes", ["unet", "pyramid"], "unet (one level) and/or pyramid.")
_IMPLS = flags.DEFINE_list(
    "impls",
    ["auto"],
    "model.conv_impl values to time side by side, interleaved ('candidates': every named one, "
    "the six that auto chooses from on CPU).",
)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    COMPILATION_CACHE,
    "Where auto's timed choice for this host is kept, as for training ('': auto untimed).",
)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per case (after one warm-up step).")
_KEEP_FREED_MEMORY = flags.DEFINE_bool(
    "keep_freed_memory",
    True,
    "Keep freed large blocks for the next step, as the commands do (runtime/memory.py); "
    "false: glibc's default, unmapped and faulted in again every step.",
)
_PAPER_BATCH = flags.DEFINE_integer(
    "paper_batch", 1, "Batch of the paper config (the paper used 3; 1 keeps a CPU run short)."
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time the PyTorch reference when installed.")
_END_TO_END = flags.DEFINE_list(
    "end_to_end", None, "Configs whose real loop is timed too (default: --configs; empty: none)."
)
_LOOP_STEPS = flags.DEFINE_integer("loop_steps", 30, "Timed loop steps, default config.")
_PAPER_LOOP_STEPS = flags.DEFINE_integer(
    "paper_loop_steps", 3, "Timed loop steps, paper config (a handful on a CPU)."
)
_PHANTOM_CASES = flags.DEFINE_integer("phantom_cases", 4, "Phantom cases the loop samples.")
_LOOP_WARMUP = flags.DEFINE_integer(
    "loop_warmup", 10, "Loop steps run untimed first, default config (the paper's: 1)."
)


def case_config(name: str, scope: str, impl: str) -> ml_collections.ConfigDict:
    """The config of one benchmark case."""
    config = load_config_file(REPO / "configs" / f"{name}.py")
    if name == "paper":
        config.train.batch_size = _PAPER_BATCH.value
    if scope == "unet":
        config.pyramid.levels = 1
    config.model.conv_impl = impl
    config.model.compute_dtype = _DTYPE.value
    return config


def impls() -> list[str]:
    """The conv_impls of --impls, `candidates` spelled out."""
    named = [impl for impl in CONV_IMPLS if impl != "auto"]
    return [name for impl in _IMPLS.value for name in (named if impl == "candidates" else [impl])]


def resolve(config: ml_collections.ConfigDict) -> autotune.Lowering:
    """What the config's conv_impl runs as on this host, `auto` resolved as training does."""
    return autotune.resolve_lowering(config, _COMPILATION_CACHE.value, say=print)


def median_seconds(function, repeats: int) -> float:
    """Median wall time of `function()` (which must block until its work is done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_peak_gflops(dtype: str) -> tuple[float, str]:
    """The best of a jitted JAX matmul and (float32 on CPU) numpy's, in GFLOP/s."""
    # 8192 on accelerators: near peak, and small beside the step in the peak-memory figure.
    size = 4096 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((size, size), dtype)
    product = jax.jit(lambda x: x @ x)
    product(a).block_until_ready()
    best = 2 * size**3 / median_seconds(lambda: product(a).block_until_ready(), 10) / 1e9
    source = "jax"
    if jax.default_backend() == "cpu" and dtype == "float32":
        b = np.ones((size, size), np.float32)
        numpy_rate = 2 * size**3 / median_seconds(lambda: b @ b, 3) / 1e9
        if numpy_rate > best:
            best, source = numpy_rate, "numpy"
    return best, source


def synthetic_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of random crops and random one-hot labels of the config's shapes."""
    generator = np.random.default_rng(seed)
    crop, classes = config.data.crop_size, config.model.num_classes
    shape = (config.train.batch_size, config.pyramid.levels, crop, crop, crop)
    image = generator.normal(size=(*shape, config.model.in_channels)).astype(np.float32)
    label = np.eye(classes, dtype=np.float32)[generator.integers(0, classes, shape)]
    return {"image": image, "label": label}


def peak_memory_mb(compiled) -> float:
    """Peak device memory of the step: the allocator's peak when known, else XLA's plan."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    analysis = compiled.memory_analysis()
    total = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    return total / 2**20


def compile_jax_step(config: ml_collections.ConfigDict, conv_impl: str) -> dict:
    """The project's train step (training.step.make_train_step) for `config`, compiled.

    Its `run()` runs one step and waits for it; also its compile time and peak memory.
    """
    mesh = parallel.make_mesh()
    model = build_pyramid(config, conv_impl)
    optimizer = make_optimizer(config.train)
    state = create_train_state(model, optimizer, config.seed)
    step = jit_train_step(make_train_step(model, optimizer, config), mesh, model.conv_impl)
    batch = parallel.put_batch(synthetic_batch(config), parallel.batch_sharded(mesh))
    rng = jax.random.key(0)
    start = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start

    def run() -> None:
        nonlocal state
        state, metrics = compiled(state, batch, rng)
        metrics["loss"].block_until_ready()

    run()  # the first call allocates: not timed
    return {"run": run, "compile_s": compile_s, "memory_mb": peak_memory_mb(compiled)}


def time_interleaved(runs: dict[str, object], steps: int) -> dict[str, float]:
    """Median seconds of each of `runs`, one step of each in turn (rotating), `steps` rounds.

    Interleaved so that a machine whose load changes during the benchmark treats them alike.
    """
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(steps):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def time_end_to_end(
    name: str, data_dir: pathlib.Path, steps: int, warmup: int = 1
) -> dict[str, float]:
    """Seconds per step of the real loop (pipeline, prefetch, step) and of its bare step."""
    config = case_config(name, "pyramid", "auto")
    config.data.dir = str(data_dir)
    config.data.num_val_cases = 1
    config.train.steps = steps + warmup
    with tempfile.TemporaryDirectory() as workdir:
        sampler, _ = loop.prepare_data(config, pathlib.Path(workdir))
    mesh = parallel.make_mesh()
    model = build_pyramid(config, resolve(config).conv_impl)
    optimizer = make_optimizer(config.train)
    state = create_train_state(model, optimizer, config.seed)
    step = jit_train_step(make_train_step(model, optimizer, config), mesh, model.conv_impl)
    batches = loop.prefetch_to_device(
        train_batches(sampler, config, 0), parallel.batch_sharded(mesh)
    )
    rng = parallel.replicated_key(config.seed + 1, mesh)
    # The first steps compile, wait for the workers to start and fault the cache's pages
    # in: not timed.
    for _ in range(warmup):
        batch = next(batches)
        state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    in_next = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        fetch = time.perf_counter()
        batch = next(batches)
        in_next += time.perf_counter() - fetch
        state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    loop_seconds = (time.perf_counter() - start) / steps

    def run_step() -> None:
        nonlocal state
        state, metrics = step(state, batch, rng)
        jax.block_until_ready(metrics)

    return {
        "loop_s": loop_seconds,
        "bare_s": median_seconds(run_step, min(steps, 5)),
        "in_next": in_next / steps / loop_seconds,
        "device_warp": sampler.device_box is not None,
        "batch": config.train.batch_size,
        "workers": config.data.worker_count,
        "spatial": spatial_augmentation_on(config.augment),
    }


def print_end_to_end(names: list[str]) -> None:
    """The end-to-end table: the real loop of each config beside its bare step."""
    header = (
        "| config | batch | workers | spatial warp | loop steps | bare s/step | loop s/step "
        "| bare steps/s | loop steps/s | loop / bare | step waits for data | host in next() |"
    )
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = pathlib.Path(tmp) / "phantom"
        phantom.write_phantom_dataset(data_dir, _PHANTOM_CASES.value, seed=0, workers=2)
        for name in names:
            steps = _PAPER_LOOP_STEPS.value if name == "paper" else _LOOP_STEPS.value
            warmup = 1 if name == "paper" else _LOOP_WARMUP.value
            r = time_end_to_end(name, data_dir, steps, warmup)
            warp = ("device" if r["device_warp"] else "host") if r["spatial"] else "off"
            print(
                f"| {name} | {r['batch']} | {r['workers']} | {warp} | {steps} "
                f"| {r['bare_s']:.3f} | {r['loop_s']:.3f} | {1 / r['bare_s']:.2f} "
                f"| {1 / r['loop_s']:.2f} | {r['bare_s'] / r['loop_s']:.2f} "
                f"| {max(0.0, 1 - r['bare_s'] / r['loop_s']):.0%} | {r['in_next']:.0%} |",
                flush=True,
            )


def cases_of(name: str) -> dict[str, ml_collections.ConfigDict]:
    """The scopes of config `name` to time, each with its config (lowering left `auto`).

    `unet` is level 1 alone; with `pyramid`, each level whose input channels differ from
    level 1's is timed alone too (`level N alone`, the U-Net's config with that level's
    channels), so that the pyramid can be set against the sum of its levels. Every level
    sees a crop of the same voxels at its own resolution, so what tells the levels apart
    is their input channels (the image, plus the coarser level's softmax where the context
    mode gives one).
    """
    cases = {}
    if "unet" in _SCOPES.value or "pyramid" in _SCOPES.value:
        cases["unet"] = case_config(name, "unet", "auto")
    if "pyramid" in _SCOPES.value:
        pyramid = case_config(name, "pyramid", "auto")
        model = build_pyramid(pyramid)
        for level in range(2, model.num_levels + 1):
            channels = model.level_in_channels(level)
            if channels != cases["unet"].model.in_channels:
                alone = cases["unet"].copy_and_resolve_references()
                alone.model.in_channels = channels
                cases.setdefault(f"level {level} alone ({channels} ch)", alone)
        cases["pyramid"] = pyramid
    return cases


def level_scopes(cases: dict[str, ml_collections.ConfigDict]) -> list[str]:
    """The scope timing each level of the pyramid alone, level 1 first (one per level)."""
    pyramid = build_pyramid(cases["pyramid"])
    by_channels = {
        config.model.in_channels: scope for scope, config in cases.items() if scope != "pyramid"
    }
    return [
        by_channels[pyramid.level_in_channels(level)] for level in range(1, pyramid.num_levels + 1)
    ]


def main(argv: list[str]) -> None:
    """Print one table row per (config, scope, lowering), PyTorch beside it; then the loop."""
    del argv
    # Before anything starts JAX's backends (the commands do the same, cli/common.py).
    kept = _KEEP_FREED_MEMORY.value and keep_freed_memory()
    torch_reference = None
    if _TORCH.value and importlib.util.find_spec("torch") is not None:
        sys.path.insert(0, str(REPO / "benchmarks"))
        import torch_reference  # noqa: PLC0415 -- optional, only when torch is installed
    peak, source = matmul_peak_gflops(_DTYPE.value)
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s): {jax.devices()[0]}")
    print(f"CPU: {environment.cpu_identity()['cpu']}; freed memory kept: {kept}")
    print(f"{_DTYPE.value} matmul peak: {peak:.0f} GFLOP/s ({source})")
    header = (
        "| config | scope | batch x crop | width | conv | compile s | s/step | Mvoxel/s "
        "| GFLOP/s | % peak | memory MB | pyramid / sum of levels | torch s/step | JAX/torch |"
    )
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for name in _CONFIGS.value:
        cases = cases_of(name)
        # Every scope and lowering of a config compiled first, then their steps interleaved
        # in one loop, so that the pyramid and its levels alone see the same machine.
        steps, labels = {}, {}
        for scope, base in cases.items():
            for impl in impls():
                config = base.copy_and_resolve_references()
                config.model.conv_impl = impl
                lowering = resolve(config)
                if impl == "auto":
                    print(f"{name}, {scope}: auto runs {lowering.describe()}", flush=True)
                labels[scope, impl] = f"auto: {lowering.conv_impl}" if impl == "auto" else impl
                steps[scope, impl] = compile_jax_step(config, lowering.conv_impl)
        seconds = time_interleaved({key: s.pop("run") for key, s in steps.items()}, _STEPS.value)
        # The steps' states are freed here: the paper config's would crowd PyTorch's out.
        gc.collect()
        torch_seconds = {}
        if torch_reference is not None:
            for scope, config in cases.items():
                torch_seconds[scope] = torch_reference.time_train_step(config, _STEPS.value)[
                    "median_s"
                ]
        alone = level_scopes(cases) if "pyramid" in cases else []
        for (scope, impl), result in steps.items():
            config = cases[scope]
            flops = train_step_flops(config)
            voxels = config.train.batch_size * config.pyramid.levels * config.data.crop_size**3
            took = seconds[scope, impl]
            gflops = flops / took / 1e9
            ratio_to_levels = "-"
            if scope == "pyramid":
                ratio_to_levels = f"{took / sum(seconds[level, impl] for level in alone):.2f}"
            torch_took = torch_seconds.get(scope)
            print(
                f"| {name} | {scope} | {config.train.batch_size} x {config.data.crop_size}³ "
                f"| {config.model.width} | {labels[scope, impl]} "
                f"| {result['compile_s']:.1f} | {took:.3f} "
                f"| {voxels / took / 1e6:.2f} | {gflops:.1f} "
                f"| {100 * gflops / peak:.0f} | {result['memory_mb']:.0f} | {ratio_to_levels} "
                f"| {f'{torch_took:.3f}' if torch_took else '-'} "
                f"| {f'{took / torch_took:.2f}' if torch_took else '-'} |",
                flush=True,
            )
        if alone and torch_seconds:
            torch_ratio = torch_seconds["pyramid"] / sum(torch_seconds[level] for level in alone)
            print(f"{name}: torch pyramid / sum of levels {torch_ratio:.2f}", flush=True)
        for scope in cases:
            if scope not in _SCOPES.value or len(impls()) == 1:
                continue
            timed = {impl: seconds[scope, impl] for impl in impls()}
            fastest = min(timed, key=timed.get)
            print(
                f"{name}, {scope}: fastest {labels[scope, fastest]}; "
                + ", ".join(
                    f"{labels[scope, impl]} x{timed[impl] / timed[fastest]:.2f}"
                    for impl in sorted(timed, key=timed.get)
                ),
                flush=True,
            )
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process peak RSS: {max_rss:.0f} MB")
    loops = _CONFIGS.value if _END_TO_END.value is None else _END_TO_END.value
    if loops:
        print_end_to_end(loops)


if __name__ == "__main__":
    app.run(main)
