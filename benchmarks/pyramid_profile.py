"""Where the pyramid's train step spends its time, against its levels' steps compiled alone.

    python benchmarks/pyramid_profile.py                      # paper config, batch 1
    python benchmarks/pyramid_profile.py --config=default --steps=5 --top=15

The steps of benchmarks/train_step.py (level 1 alone, every other level alone with its own
input channels, the whole pyramid; `auto` resolved as training resolves it) are compiled,
run once untimed, then `--steps` times each, interleaved, under `jax.profiler`. The trace's
XLA operations (the thunks of XLA's CPU runtime, the kernels on a GPU) are summed by kind:
the HLO instruction's name without its number (`fusion`, `convolution`, `copy`,
`transpose`, ...). It prints, per step, the wall time and the operations' time of the
pyramid and of the sum of its levels, then the kinds that take the most time, with the
difference: where a pyramid that costs more than its levels loses it.

On a CPU XLA runs independent operations at once on its threads, so the operations' time
can pass the wall time; the difference between the two columns is what matters.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile

import jax
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train_step  # noqa: E402 -- the steps as train_step.py builds and times them

_CONFIG = flags.DEFINE_string("config", "paper", "configs/NAME.py to profile.")
_STEPS_PROFILED = flags.DEFINE_integer("profiled_steps", 2, "Profiled steps of each scope.")
_TOP = flags.DEFINE_integer("top", 12, "Kinds of operation printed.")

# Events of the trace that are not XLA operations: the Python and runtime around them.
_NOT_AN_OPERATION = re.compile(r"::|\(|^\$|^end: |Threadpool|^Handle |^Wait for |^Allocate")


def operation_kind(name: str) -> str:
    """The kind of the HLO instruction `name` (`fusion.12` -> `fusion`)."""
    return re.sub(r"[._]\d+$", "", name)


def operation_seconds(trace_folder: pathlib.Path) -> dict[str, float]:
    """Seconds of the XLA operations of the trace in `trace_folder`, summed by kind."""
    (path,) = trace_folder.glob("plugins/profile/*/*.trace.json.gz")
    with gzip.open(path) as file:
        trace = json.load(file)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    seconds: dict[str, float] = collections.defaultdict(float)
    for event in events:
        name = event.get("name", "")
        if event.get("ph") == "X" and not _NOT_AN_OPERATION.search(name):
            seconds[operation_kind(name)] += event.get("dur", 0.0) / 1e6
    return dict(seconds)


def profile(run, steps: int) -> tuple[float, dict[str, float]]:
    """Median wall seconds of `run()` over `steps` profiled calls, and its operations' seconds
    per step by kind."""
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=False)
        wall = train_step.median_seconds(run, steps)
        jax.profiler.stop_trace()
        by_kind = operation_seconds(pathlib.Path(folder))
    return wall, {kind: value / steps for kind, value in by_kind.items()}


def main(argv: list[str]) -> None:
    """Print the pyramid's operations by kind beside the sum of its levels' alone."""
    del argv
    if train_step._KEEP_FREED_MEMORY.value:
        train_step.keep_freed_memory()
    name = _CONFIG.value
    cases = train_step.cases_of(name)
    if "pyramid" not in cases:
        raise app.UsageError("--scopes must include pyramid")
    steps = {}
    for scope, config in cases.items():
        conv_impl = train_step.resolve(config).conv_impl
        print(f"{name}, {scope}: {conv_impl}, compiling ...", flush=True)
        steps[scope] = train_step.compile_jax_step(config, conv_impl)["run"]
    walls, kinds = {}, {}
    for scope, run in steps.items():
        walls[scope], kinds[scope] = profile(run, _STEPS_PROFILED.value)
    levels = train_step.level_scopes(cases)
    summed: dict[str, float] = collections.defaultdict(float)
    for scope in levels:
        for kind, value in kinds[scope].items():
            summed[kind] += value
    pyramid = kinds["pyramid"]
    level_wall = sum(walls[scope] for scope in levels)
    print(f"CPU: {train_step.environment.cpu_identity()['cpu']}; {jax.devices()[0]}")
    print(f"levels timed alone: {', '.join(levels)}")
    print("| per step | pyramid | sum of levels | pyramid / levels |")
    print("| --- | --- | --- | --- |")
    print(
        f"| wall | {walls['pyramid']:.3f} s | {level_wall:.3f} s "
        f"| {walls['pyramid'] / level_wall:.2f} |"
    )
    ops_pyramid, ops_levels = sum(pyramid.values()), sum(summed.values())
    print(
        f"| XLA operations | {ops_pyramid:.3f} s | {ops_levels:.3f} s "
        f"| {ops_pyramid / ops_levels:.2f} |"
    )
    print()
    print("| operation | pyramid s/step | share | sum of levels s/step | pyramid - levels |")
    print("| --- | --- | --- | --- | --- |")
    top = sorted(
        set(pyramid) | set(summed), key=lambda kind: -max(pyramid.get(kind, 0), summed.get(kind, 0))
    )
    for kind in top[: _TOP.value]:
        mine, theirs = pyramid.get(kind, 0.0), summed.get(kind, 0.0)
        print(
            f"| {kind} | {mine:.3f} | {mine / ops_pyramid:.0%} | {theirs:.3f} "
            f"| {mine - theirs:+.3f} |"
        )


if __name__ == "__main__":
    app.run(main)
