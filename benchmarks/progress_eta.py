"""How true the training bar's ETA was: its ETA at each tenth of a run against what followed.

    autocontext train --config configs/default.py --workdir runs/eta 2> train.err
    python benchmarks/progress_eta.py train.err [--workdir runs/eta]

Reads the train bar's frames from the captured standard error (tqdm redraws them with
carriage returns; each shows `n/total [elapsed<remaining, rate]`). The bar starts after the
first step, so `elapsed` counts from the same moment in every frame, and the remaining
time the bar promised at step n is checked against the real one: the last frame's elapsed
minus this frame's. With `--workdir`, it also prints the seconds the run spent validating
(`val_seconds` in metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re

FRAME = re.compile(r"train:.*?\|\s*(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")


def seconds(clock: str) -> float:
    """[[h:]m:]s as seconds."""
    total = 0.0
    for part in clock.split(":"):
        total = 60 * total + float(part)
    return total


def frames(text: str) -> list[tuple[int, int, float, float | None]]:
    """(n, total, elapsed s, ETA s or None) of every train bar frame, in order."""
    found = []
    for piece in re.split(r"[\r\n]", text):
        match = FRAME.search(piece)
        if match:
            n, total, elapsed, remaining = match.groups()
            eta = None if "?" in remaining else seconds(remaining)
            found.append((int(n), int(total), seconds(elapsed), eta))
    return found


def main() -> None:
    """Print the ETA against the real remaining time at every tenth of the run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stderr", type=pathlib.Path, help="captured standard error of train")
    parser.add_argument("--workdir", type=pathlib.Path, help="the run's workdir")
    args = parser.parse_args()
    found = frames(args.stderr.read_text(errors="replace"))
    if not found:
        raise SystemExit(f"{args.stderr}: no train bar frames")
    end_n, total, end_elapsed, _ = found[-1]
    print(f"bar: {end_n}/{total} steps in {end_elapsed:.0f} s after the first step")
    print("fraction  step  ETA shown (s)  real remaining (s)  error")
    for tenth in range(1, 10):
        frame = next((f for f in found if f[0] >= total * tenth / 10 and f[3] is not None), None)
        if frame is None:
            continue
        n, _, elapsed, eta = frame
        real = end_elapsed - elapsed
        error = 100 * (eta / real - 1)
        print(f"{tenth * 10:>7} % {n:>5} {eta:>14.0f} {real:>19.0f} {error:>+6.1f} %")
    if args.workdir:
        lines = (args.workdir / "metrics.jsonl").read_text().splitlines()
        spent = [json.loads(line).get("val_seconds") for line in lines]
        spent = [s for s in spent if s is not None]
        print(f"validation: {len(spent)} times, {sum(spent):.1f} s in all ({spent})")


if __name__ == "__main__":
    main()
