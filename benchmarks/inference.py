"""Time tiled pyramid inference on a generated CT-sized volume, with random weights.

    python benchmarks/inference.py --config default --config paper --size 512 512 400

Prints, per config: wall seconds (compilation reported apart), tiles/s, achieved GFLOP/s
against the analytic FLOPs of the tiles (models/flops.py, checked against XLA's own count
of one tile), and the process's peak host memory. The
weights are the random initialisation: the speed of a trained network is the same.
The work timed is `inference.predict_pyramid` plus the final labels on the scan's grid
(`--scan_size`, spanning the same extent; by default the volume's own grid, as for a scan
already at the plan's spacing), i.e. `predict` without reading and writing files.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import resource
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from autocontext_jax import inference  # noqa: E402
from autocontext_jax.config.files import load_config_file  # noqa: E402
from autocontext_jax.data.plan import Plan  # noqa: E402
from autocontext_jax.data.sampling import downsample_factor  # noqa: E402
from autocontext_jax.inference import tiling  # noqa: E402
from autocontext_jax.models import build_pyramid  # noqa: E402
from autocontext_jax.models.flops import unet_forward_flops  # noqa: E402
from autocontext_jax.models.init import init_variables  # noqa: E402
from autocontext_jax.runtime import parallel  # noqa: E402

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def level_tiles(model, shape, options):
    """(grid, tile shape, tile count, in channels) of every level for a native `shape`."""
    padded = [n + (-n % model.padding_multiple) for n in shape]
    tile = (options.tile_size,) * 3
    out = []
    for level in range(1, model.num_levels + 1):
        grid = [n // downsample_factor(level, model.num_levels) for n in padded]
        count = math.prod(
            len(tiling.tile_starts(n, options.tile_size, options.overlap)) for n in grid
        )
        out.append((grid, tile, count, model.level_in_channels(level)))
    return out


def xla_flops(model, variables, level, tile, channels, options, mesh) -> float:
    """XLA's FLOP count of one tile of `level` (a check of the analytic count)."""
    context = model.takes_context(level)
    predictor = tiling.make_tile_predictor(
        model, tile, options.weighting, options.mirror, context, mesh
    )
    batch = mesh.size
    images = jax.ShapeDtypeStruct((batch, *tile, 1), np.float32)
    coarse = (
        jax.ShapeDtypeStruct((batch, *(t // 2 + 2 for t in tile), model.num_classes), np.float32)
        if context
        else None
    )
    lowered = predictor.lower(tiling.level_variables(variables, level), images, coarse)
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan"))) / batch


def warm_up(model, variables, plan, options, mesh) -> float:
    """Compile every level's tile predictor (cached) by running one batch; seconds taken."""
    start = time.perf_counter()
    for level, (_, tile, _, _) in enumerate(plan, start=1):
        context = model.takes_context(level)
        predictor = tiling.make_tile_predictor(
            model, tile, options.weighting, options.mirror, context, mesh
        )
        batch = options.tiles_per_batch * mesh.size
        # Placed as predict_level places its tiles, so the same compiled program is used.
        sharding = parallel.batch_sharded(mesh)
        images = jax.device_put(np.zeros((batch, *tile, 1), np.float32), sharding)
        coarse = (
            jax.device_put(
                np.zeros((batch, *(t // 2 + 2 for t in tile), model.num_classes), np.float32),
                sharding,
            )
            if context
            else None
        )
        jax.block_until_ready(predictor(tiling.level_variables(variables, level), images, coarse))
    return time.perf_counter() - start


def run(name: str, shape: tuple[int, int, int], args) -> None:
    """Benchmark one config and print its line."""
    scan_shape = tuple(args.scan_size or shape)
    config = load_config_file(CONFIGS / f"{name}.py")
    for field in ("width", "num_poolings"):
        if getattr(args, field) is not None:
            config.model[field] = getattr(args, field)
    model = build_pyramid(config)
    variables = init_variables(model, 0)
    variables = jax.device_put(variables, parallel.replicated(parallel.make_mesh()))
    options = inference.TilingOptions(
        tile_size=args.tile_size or 2 * config.data.crop_size,
        overlap=args.overlap,
        weighting=args.weighting,
        mirror=args.mirror,
        tiles_per_batch=args.tiles_per_batch,
    )
    mesh = parallel.make_mesh()
    plan = level_tiles(model, shape, options)
    flips = 8 if options.mirror else 1
    model_config = config.model
    flops = flips * sum(
        count
        * unet_forward_flops(
            tile, channels, model_config.num_classes, model_config.width, model_config.num_poolings
        )
        for _, tile, count, channels in plan
    )
    tiles = sum(count for *_, count, _ in plan)
    level, (_, tile, _, channels) = len(plan), plan[-1]
    analytic_tile = flips * unet_forward_flops(
        tile, channels, model_config.num_classes, model_config.width, model_config.num_poolings
    )
    xla_tile = xla_flops(model, variables, level, tile, channels, options, mesh)
    compile_seconds = warm_up(model, variables, plan, options, mesh)

    rng = np.random.default_rng(0)
    # Air around a soft-tissue body with noise: realistic value ranges, content irrelevant.
    hu = np.full(shape, -1000.0, np.float32)
    body = tuple(slice(n // 8, n - n // 8) for n in shape)
    hu[body] = 40.0 + 200.0 * rng.standard_normal(hu[body].shape, dtype=np.float32)
    window = Plan.window(config.data, (1.0, 1.0, 1.0))
    image = window.normalize(hu)
    del hu

    for _ in range(args.repeat):
        start = time.perf_counter()
        probs = inference.predict_pyramid(model, variables, image, window.pad_value, options, mesh)
        tiled = time.perf_counter() - start
        labels = inference.upsample_to_native(
            probs[-1], downsample_factor(level, level), shape, grid_shape=scan_shape
        )
        wall = time.perf_counter() - start
        del probs
    assert labels.shape == scan_shape
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    grids = " / ".join("x".join(map(str, g)) for g, *_ in plan)
    print(
        f"{name} (width {config.model.width}, {config.model.num_poolings} poolings): "
        f"volume {'x'.join(map(str, shape))}, level grids {grids}, "
        f"tile {options.tile_size}, overlap {options.overlap}, {options.weighting}, "
        f"mirror {options.mirror}, "
        f"batch {options.tiles_per_batch}x{mesh.size} on {jax.devices()[0].device_kind}\n"
        f"  tiles {tiles}, wall {wall:.1f} s (tiles {tiled:.1f} s, labels on the "
        f"{'x'.join(map(str, scan_shape))} scan grid "
        f"{wall - tiled:.1f} s; + compile {compile_seconds:.1f} s before), "
        f"{tiles / wall:.2f} tiles/s, {flops / 1e9:.0f} GFLOP analytic, "
        f"{flops / wall / 1e9:.1f} GFLOP/s, peak host RSS {peak_gib:.2f} GiB\n"
        f"  one level-{level} tile: analytic {analytic_tile / 1e9:.2f} GFLOP, "
        f"XLA cost analysis {xla_tile / 1e9:.2f} GFLOP",
        flush=True,
    )


def main() -> None:
    """Parse the options and benchmark each config in turn."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", help="configs/NAME.py (repeatable)")
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 400))
    parser.add_argument(
        "--scan_size", type=int, nargs=3, default=None, help="the scan's grid; default: --size"
    )
    parser.add_argument("--tile_size", type=int, default=None, help="default: 2 x crop size")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--weighting", default="gaussian", choices=inference.WEIGHTINGS)
    parser.add_argument("--mirror", action="store_true")
    parser.add_argument("--tiles_per_batch", type=int, default=1)
    parser.add_argument("--width", type=int, default=None, help="override config.model.width")
    parser.add_argument("--num_poolings", type=int, default=None, help="override the config's")
    parser.add_argument("--repeat", type=int, default=1, help="time the last of N runs")
    args = parser.parse_args()
    for name in args.config or ["default", "paper"]:
        run(name, tuple(args.size), args)


if __name__ == "__main__":
    main()
