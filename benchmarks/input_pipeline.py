"""Examples/s of the augmented input pipeline beside the train step's, on this machine.

    python benchmarks/input_pipeline.py [--batches 20] [--paper_batches 3] [--workers 1 2]

Writes a few phantom cases (default shape) and their preprocessed cache under a
temporary folder, then times the Grain pipeline of the default and paper configs with
each worker count (first batch excluded: worker start-up and reading): the paper config
with its spatial augmentation on both paths (`augment.device`: `host` warps in the
workers, `device` only cuts raw boxes there), then the device path's warp inside the step
(the jitted data/device_augment.py: device_pyramid_crops on one paper batch), and the
jitted train step of the default config on batches of that pipeline.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

from autocontext_jax import phantom  # noqa: E402
from autocontext_jax.cli.common import COMPILATION_CACHE  # noqa: E402
from autocontext_jax.config.files import load_config_file  # noqa: E402
from autocontext_jax.data import cache  # noqa: E402
from autocontext_jax.data import dataset as dataset_lib  # noqa: E402
from autocontext_jax.data.device_augment import device_pyramid_crops  # noqa: E402
from autocontext_jax.data.pipeline import PyramidExampleSampler, train_batches  # noqa: E402
from autocontext_jax.models import build_pyramid  # noqa: E402
from autocontext_jax.runtime import autotune, parallel  # noqa: E402
from autocontext_jax.training.state import create_train_state, make_optimizer  # noqa: E402
from autocontext_jax.training.step import jit_train_step, make_train_step  # noqa: E402


def _sampler(config, data_dir: pathlib.Path) -> PyramidExampleSampler:
    files = dataset_lib.list_cases(data_dir)
    plan, cached = cache.ensure_preprocessed(config, files, files)
    return PyramidExampleSampler([cached[f.case_id] for f in files], config, plan)


def pipeline_examples_per_second(config, data_dir: pathlib.Path, batches: int) -> float:
    """Examples/s of `batches` batches after the first one."""
    config.train.steps = batches + 1
    iterator = train_batches(_sampler(config, data_dir), config, 0)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * config.train.batch_size / (time.perf_counter() - start)


def device_warp_seconds(config, data_dir: pathlib.Path, repeats: int) -> tuple[float, float]:
    """(compile s, median s) of the jitted device warp of one batch of the device path."""
    config.train.steps = 1
    batch = next(train_batches(_sampler(config, data_dir), config, 0))
    crops = jax.jit(
        lambda b: device_pyramid_crops(
            b, config.data.crop_size, config.pyramid.levels, config.model.num_classes
        )
    )
    on_device = jax.device_put(batch)
    start = time.perf_counter()
    jax.block_until_ready(crops(on_device))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(crops(on_device))
        times.append(time.perf_counter() - start)
    return compile_s, float(np.median(times))


def step_examples_per_second(config, data_dir: pathlib.Path, steps: int) -> float:
    """Examples/s of the jitted train step on pipeline batches already on the device."""
    config.train.steps = steps + 1
    config.train.schedule = "constant"  # the step costs the same; no warm-up to fit
    # The lowering training runs on this host (auto timed once, or read from the cache).
    model = build_pyramid(config, autotune.resolve_lowering(config, COMPILATION_CACHE).conv_impl)
    optimizer = make_optimizer(config.train)
    mesh = parallel.make_mesh()
    state = jax.device_put(
        create_train_state(model, optimizer, config.seed), parallel.replicated(mesh)
    )
    step = jit_train_step(make_train_step(model, optimizer, config), mesh, model.conv_impl)
    sharding = parallel.batch_sharded(mesh)
    batches = [
        parallel.put_batch(b, sharding)
        for b in train_batches(_sampler(config, data_dir), config, 0)
    ]
    rng = jax.random.key(0)
    state, metrics = step(state, batches[0], rng)  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for batch in batches[1:]:
        state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    return steps * config.train.batch_size / (time.perf_counter() - start)


def main() -> None:
    """Print the examples/s table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20, help="timed batches, default config")
    parser.add_argument("--paper_batches", type=int, default=3, help="timed batches, paper")
    parser.add_argument(
        "--device_batches", type=int, default=20, help="timed batches, paper on the device path"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cases", type=int, default=4, help="phantom cases to sample from")
    args = parser.parse_args()
    print(f"devices: {jax.devices()}")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = pathlib.Path(tmp) / "phantom"
        phantom.write_phantom_dataset(data_dir, args.cases, seed=0, workers=2)
        cases = (
            ("default", "host", args.batches),
            ("paper", "host", args.paper_batches),
            ("paper", "device", args.device_batches),
        )
        for name, where, batches in cases:
            for workers in args.workers:
                config = load_config_file(REPO / "configs" / f"{name}.py")
                config.data.dir = str(data_dir)
                config.data.worker_count = workers
                config.augment.device = where
                rate = pipeline_examples_per_second(config, data_dir, batches)
                label = f"pipeline {name}, {where} warp, {workers} worker(s)"
                print(
                    f"{label:<46} {rate:8.2f} examples/s  {rate / workers:8.2f} per worker",
                    flush=True,
                )
        config = load_config_file(REPO / "configs" / "paper.py")
        config.data.dir = str(data_dir)
        config.augment.device = "device"
        compile_s, seconds = device_warp_seconds(config, data_dir, repeats=3)
        batch = config.train.batch_size
        label = f"warp in the step, paper, device, batch {batch}"
        print(
            f"{label:<46} {seconds:8.3f} s/batch  {batch / seconds:8.2f} examples/s"
            f"  (compile {compile_s:.1f} s)",
            flush=True,
        )
        config = load_config_file(REPO / "configs" / "default.py")
        config.data.dir = str(data_dir)
        rate = step_examples_per_second(config, data_dir, args.batches)
        print(f"{'train step default':<46} {rate:8.2f} examples/s", flush=True)


if __name__ == "__main__":
    main()
