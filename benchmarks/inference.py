"""Time tiled pyramid inference on a generated CT-sized volume, with random weights.

    python benchmarks/inference.py --config default --config paper --size 512 512 400

Prints, per config: wall seconds (compilation reported apart), tiles/s, achieved GFLOP/s
against the analytic FLOPs of the tiles (models/flops.py, checked against XLA's own count
of one tile), and the process's peak host memory. The
weights are the random initialisation: the speed of a trained network is the same.
The work timed is `inference.predict_pyramid` plus the final labels on the scan's grid
(`--scan_size`, spanning the same extent; by default the volume's own grid, as for a scan
already at the plan's spacing), i.e. `predict` without reading and writing files.

Where torch and monai are installed (`pip install torch==2.13.0 monai`; neither is a
dependency of the package), it then times the same networks under MONAI's
`sliding_window_inference` on the same volume, with the same tile, overlap and Gaussian
blending and our JAX weights copied into the PyTorch reference (benchmarks/
monai_reference.py says how each level is run and where the two cannot match): one U-Net
level (`unet`, a one-level pyramid at half resolution) and the whole pyramid, the median of
`--monai_runs` interleaved runs each after an untimed run on a small volume where the two
tile layouts coincide, whose outputs must agree. `--no-monai` skips it.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import pathlib
import resource
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autocontext_jax import inference  # noqa: E402
from autocontext_jax.cli.common import COMPILATION_CACHE  # noqa: E402
from autocontext_jax.config.files import load_config_file  # noqa: E402
from autocontext_jax.data.plan import Plan  # noqa: E402
from autocontext_jax.data.sampling import downsample_factor  # noqa: E402
from autocontext_jax.inference import tiling  # noqa: E402
from autocontext_jax.models import build_pyramid  # noqa: E402
from autocontext_jax.models.flops import unet_forward_flops  # noqa: E402
from autocontext_jax.models.init import init_variables  # noqa: E402
from autocontext_jax.runtime import autotune, parallel  # noqa: E402
from autocontext_jax.runtime.memory import keep_freed_memory  # noqa: E402

# MONAI's sliding windows are timed beside ours only where torch and monai are installed.
MONAI_INSTALLED = all(importlib.util.find_spec(name) for name in ("torch", "monai"))
if MONAI_INSTALLED:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import monai_reference  # noqa: E402

CONFIGS = REPO / "configs"
# Largest |JAX - MONAI| probability accepted where the two tile layouts coincide: float32
# rounding of the same function (about 1e-7 measured), far below any real discrepancy.
AGREEMENT_TOLERANCE = 1e-4


def level_tiles(model, shape, options):
    """(grid, tile shape, tile count, in channels) of every level for a native `shape`."""
    padded = [n + (-n % model.padding_multiple) for n in shape]
    tile = (options.tile_size,) * 3
    out = []
    for level in range(1, model.num_levels + 1):
        grid = [n // downsample_factor(level, model.num_levels) for n in padded]
        count = len(tiling.tile_corners(grid, options.tile_size, options.overlap))
        out.append((grid, tile, count, model.level_in_channels(level)))
    return out


def xla_flops(model, variables, level, tile, channels, options, mesh) -> float:
    """XLA's FLOP count of one tile of `level` (a check of the analytic count)."""
    context = model.takes_context(level)
    # All seven arguments, as predict_level passes them: lru_cache keys on how a call is
    # written, so a call relying on the default would compile a second predictor.
    predictor = tiling.make_tile_predictor(
        model, tile, options.weighting, options.mirror, context, mesh, False
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
            model, tile, options.weighting, options.mirror, context, mesh, False
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


def synthetic_scan(
    config: ml_collections.ConfigDict, shape: tuple[int, ...], seed: int
) -> tuple[np.ndarray, float]:
    """A normalised volume of air around a noisy soft-tissue body, and the pad value."""
    rng = np.random.default_rng(seed)
    # Realistic value ranges; the content does not matter to the speed.
    hu = np.full(shape, -1000.0, np.float32)
    body = tuple(slice(n // 8, n - n // 8) for n in shape)
    hu[body] = 40.0 + 200.0 * rng.standard_normal(hu[body].shape, dtype=np.float32)
    window = Plan.window(config.data, (1.0, 1.0, 1.0))
    return window.normalize(hu), window.pad_value


def run(name: str, shape: tuple[int, int, int], args) -> None:
    """Benchmark one config and print its line."""
    scan_shape = tuple(args.scan_size or shape)
    config = load_config_file(CONFIGS / f"{name}.py")
    for field in ("width", "num_poolings"):
        if getattr(args, field) is not None:
            config.model[field] = getattr(args, field)
    # The lowering predict runs on this host (auto timed once, or read from the cache).
    lowering = autotune.resolve_lowering(config, COMPILATION_CACHE, say=print)
    print(f"{name}: convolution {lowering.describe()}")
    model = build_pyramid(config, lowering.conv_impl)
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

    image, pad_value = synthetic_scan(config, shape, seed=0)

    for _ in range(args.repeat):
        start = time.perf_counter()
        probs = inference.predict_pyramid(model, variables, image, pad_value, options, mesh)
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
    if args.monai and MONAI_INSTALLED:
        compare_with_monai(config, image, pad_value, options, args)


def time_against_monai(
    config: ml_collections.ConfigDict,
    scope: str,
    image: np.ndarray,
    pad_value: float,
    options: inference.TilingOptions,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Our tiled inference and MONAI's of one scope on `image`, interleaved; medians and checks.

    The untimed first run, on a small volume where the two tile layouts coincide, compiles
    our predictors, warms oneDNN's kernels and checks that the outputs agree.
    """
    scope_config = copy.deepcopy(config)
    if scope == "unet":
        # One U-Net at the finest level's resolution, as train_step.py's `unet` scope.
        scope_config.pyramid.levels = 1
    model = build_pyramid(scope_config)
    mesh = parallel.make_mesh()
    host_variables = monai_reference.with_random_statistics(init_variables(model, 0), seed=0)
    variables = jax.device_put(host_variables, parallel.replicated(mesh))
    nets = monai_reference.level_networks(host_variables, model.num_levels)

    def ours(volume: np.ndarray) -> list[np.ndarray]:
        return inference.predict_pyramid(model, variables, volume, pad_value, options, mesh)

    def theirs(volume: np.ndarray) -> monai_reference.MonaiRun:
        batch = options.tiles_per_batch * mesh.size
        return monai_reference.predict_pyramid(nets, model, volume, pad_value, options, batch)

    def difference(jax_probs: list[np.ndarray], monai_run: monai_reference.MonaiRun) -> float:
        pairs = zip(jax_probs, monai_run.probabilities, strict=True)
        return max(float(np.abs(a - monai_reference.channels_last(b)).max()) for a, b in pairs)

    check_shape = monai_reference.aligned_shape(model, options.tile_size, options.overlap)
    check_image, _ = synthetic_scan(config, check_shape, seed=1)
    check_run = theirs(check_image)
    layout = monai_reference.our_corners(model, check_shape, options.tile_size, options.overlap)
    if check_run.corners != layout:
        raise RuntimeError(f"tile layouts differ on the check volume {check_shape}")
    check = difference(ours(check_image), check_run)
    if not check <= AGREEMENT_TOLERANCE:
        raise RuntimeError(
            f"{scope}: JAX and MONAI outputs differ by {check:.3g} on {check_shape} "
            f"(> {AGREEMENT_TOLERANCE}): the two do not compute the same function"
        )

    jax_seconds, monai_seconds = [], []
    for _ in range(args.monai_runs):
        start = time.perf_counter()
        jax_probs = ours(image)
        jax_seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        monai_run = theirs(image)
        monai_seconds.append(time.perf_counter() - start)
    ours_layout = monai_reference.our_corners(
        model, image.shape, options.tile_size, options.overlap
    )
    return {
        "levels": model.num_levels,
        "check_shape": check_shape,
        "check": check,
        "jax_s": float(np.median(jax_seconds)),
        "monai_s": float(np.median(monai_seconds)),
        "jax_tiles": sum(len(level) for level in ours_layout),
        "monai_tiles": monai_run.tiles,
        "same_layout": monai_run.corners == ours_layout,
        # On the timed volume: float32 rounding plus, where the layouts differ, the blend of
        # differently placed tiles.
        "timed_difference": difference(jax_probs, monai_run),
    }


def compare_with_monai(
    config: ml_collections.ConfigDict,
    image: np.ndarray,
    pad_value: float,
    options: inference.TilingOptions,
    args: argparse.Namespace,
) -> None:
    """Time MONAI's sliding windows against our tiled inference, same volume and weights; print."""
    if config.model.compute_dtype != "float32":
        print("  MONAI: skipped, the PyTorch reference runs float32 only", flush=True)
        return
    threads = monai_reference.use_all_cores()
    step = int(options.tile_size * (1 - options.overlap))
    pyramid_rule = (
        "    MONAI's pyramid: each level's whole grid through sliding_window_inference, "
        "coarsest first, the coarser softmax upsampled x2 over the whole grid and "
        "concatenated as input channels (ours upsamples it tile by tile)\n"
        if "pyramid" in args.monai_scopes
        else ""
    )
    print(
        f"  against MONAI's sliding_window_inference ({monai_reference.versions()}, float32, "
        f"torch on {threads} threads: the {threads} cores XLA's CPU client uses), our random "
        f"JAX weights copied into torch_reference.UNet3D (biases and BatchNorm statistics "
        f"drawn at random too):\n"
        f"    roi_size {options.tile_size}, overlap {options.overlap}, {options.weighting} "
        f"blending (our weight map: sigma_scale 1/8), sw_batch_size "
        f"{options.tiles_per_batch * jax.device_count()}, mirror {options.mirror}; tile "
        f"starts: ours spread evenly, MONAI's every {step} voxels with the last flush\n"
        f"{pyramid_rule}"
        f"    median of {args.monai_runs} interleaved runs each, after an untimed run on a "
        f"small volume where the two tile layouts coincide and the outputs must agree",
        flush=True,
    )
    for scope in args.monai_scopes:
        r = time_against_monai(config, scope, image, pad_value, options, args)
        layout = "same tile starts" if r["same_layout"] else "tile starts differ"
        what = (
            "one U-Net at half resolution"
            if scope == "unet"
            else f"{r['levels']}-level pyramid, all levels"
        )
        print(
            f"  {scope} ({what}): JAX {r['jax_s']:.2f} s, MONAI {r['monai_s']:.2f} s, "
            f"JAX/MONAI {r['jax_s'] / r['monai_s']:.2f}; tiles {r['jax_tiles']} JAX, "
            f"{r['monai_tiles']} MONAI ({layout})\n"
            f"    max |p_JAX - p_MONAI|: {r['check']:.1e} on the "
            f"{'x'.join(map(str, r['check_shape']))} check volume (same tiles), "
            f"{r['timed_difference']:.1e} on the timed volume",
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
    parser.add_argument(
        "--monai",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time MONAI's sliding_window_inference (when torch and monai are installed)",
    )
    parser.add_argument("--monai_runs", type=int, default=3, help="timed runs of each, median")
    parser.add_argument(
        "--keep_freed_memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep freed large blocks for reuse, as predict does (runtime/memory.py)",
    )
    parser.add_argument(
        "--monai_scopes", nargs="+", default=["unet", "pyramid"], choices=["unet", "pyramid"]
    )
    args = parser.parse_args()
    # Before anything starts JAX's backends, as the commands do (cli/common.py).
    kept = args.keep_freed_memory and keep_freed_memory()
    print(f"freed memory kept: {kept}", flush=True)
    if args.monai and not MONAI_INSTALLED:
        print(
            "MONAI comparison skipped: torch and monai are not installed "
            "(pip install torch==2.13.0 monai)",
            flush=True,
        )
    for name in args.config or ["default", "paper"]:
        run(name, tuple(args.size), args)


if __name__ == "__main__":
    main()
