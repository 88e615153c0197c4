"""Inject the faults a cluster brings into small training runs; check nothing good is lost.

    python scripts/fault_injection.py                        # 20 random kills + every fault
    python scripts/fault_injection.py --kills=3 --faults=sigkill,corrupt --keep=/tmp/faults

Each fault runs `autocontext train` on a tiny phantom in a subprocess, strikes it (SIGKILL or
SIGTERM at a random moment, a diverging learning rate, random bytes or a truncation in the
newest checkpoint, a second run in the same workdir, a disk that fills up), then resumes the
run and compares its final train state with an uninterrupted run's, bit for bit. It prints
one row per strike and a table (fault, count, outcome). The exit code is non-zero when any
strike lost good state or ended differently from the uninterrupted run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from autocontext_jax import phantom
from autocontext_jax.runtime.checksums import find_damage

REPO = pathlib.Path(__file__).resolve().parents[1]
FAULTS = (
    "sigkill",
    "sigterm",
    "nan",
    "corrupt",
    "truncate",
    "missing_file",
    "concurrent",
    "disk_full",
)

_TERM_GRACE_S = 20.0  # a SIGTERMed run must have saved and exited within this


@dataclasses.dataclass
class Strike:
    """One fault injected into one run, and what came of it."""

    fault: str
    detail: str
    ok: bool
    outcome: str


def _run_flags(data_dir: pathlib.Path, workdir: pathlib.Path, steps: int, *extra: str) -> list:
    """`autocontext train` on a tiny pyramid with a Grain worker, frequent saves, no eval."""
    return [
        sys.executable,
        "-m",
        "autocontext_jax",
        "train",
        f"--config={REPO / 'configs' / 'default.py'}",
        f"--workdir={workdir}",
        f"--config.data.dir={data_dir}",
        "--config.data.phantom_cases=0",
        "--config.data.num_val_cases=1",
        "--config.data.crop_size=8",
        "--config.data.worker_count=1",
        "--config.model.width=2",
        "--config.model.num_poolings=1",
        f"--config.train.steps={steps}",
        "--config.train.batch_size=2",
        "--config.train.warmup_steps=2",
        "--config.train.checkpoint_every=5",
        "--config.train.log_every=5",
        "--config.train.keep_checkpoints=3",
        "--config.eval.at_end=False",
        *extra,
    ]


def _start(command: list, log: pathlib.Path) -> subprocess.Popen:
    """Start a run in its own process group, its output into `log`."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    with log.open("ab") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )


def _finish(process: subprocess.Popen, timeout: float = 900.0) -> int:
    """The exit code of a run that is left to end by itself."""
    return process.wait(timeout=timeout)


def _committed_steps(workdir: pathlib.Path) -> list[int]:
    """Steps whose checkpoint folders were committed (Orbax renames them when done)."""
    folder = workdir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _read_state(workdir: pathlib.Path, step: int) -> list[np.ndarray] | None:
    """The train state's leaves of one checkpoint, or None when it cannot be read."""
    folder = workdir / "checkpoints" / str(step)
    if not (folder / "state").is_dir() or find_damage(folder) is not None:
        return None
    path = folder / "state"
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(path.absolute())
    except Exception:  # noqa: BLE001 - any failure to read is what we look for
        return None
    return [np.asarray(leaf) for leaf in jax.tree.leaves(restored)]


def _finite(leaves: list[np.ndarray]) -> bool:
    return all(np.isfinite(a).all() for a in leaves if np.issubdtype(a.dtype, np.floating))


def _equal(a: list[np.ndarray] | None, b: list[np.ndarray] | None) -> bool:
    """Bit-for-bit equality of two train states."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))


def _log_text(log: pathlib.Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def _wait_for_checkpoint(workdir: pathlib.Path, process: subprocess.Popen, step: int) -> bool:
    """Wait until the checkpoint of `step` or a later one is committed; False if the run ended."""
    while process.poll() is None:
        if any(s >= step for s in _committed_steps(workdir)):
            return True
        time.sleep(0.05)
    return any(s >= step for s in _committed_steps(workdir))


class Injector:
    """Runs the strikes against one uninterrupted reference run."""

    def __init__(self, root: pathlib.Path, steps: int, rng: random.Random):
        self.root, self.steps, self.rng = root, steps, rng
        self.data = root / "data"
        phantom.write_phantom_dataset(
            self.data, 5, seed=3, shape=(48, 40, 32), spacing=(4.0, 4.0, 4.0)
        )
        self.count = collections.Counter()
        workdir, log = self._fresh("reference")
        self.reference_dir = workdir
        began = time.perf_counter()
        process = _start(_run_flags(self.data, workdir, steps), log)
        first_step = None
        while process.poll() is None:
            if first_step is None and _committed_steps(workdir):
                first_step = time.perf_counter() - began
            time.sleep(0.05)
        self.duration = time.perf_counter() - began
        if process.returncode != 0:
            raise RuntimeError(f"the reference run failed; see {log}")
        self.first_checkpoint_s = first_step or self.duration / 2
        self.reference = _read_state(workdir, steps)
        print(
            f"reference: {steps} steps in {self.duration:.1f} s, first checkpoint after "
            f"{self.first_checkpoint_s:.1f} s",
            flush=True,
        )

    def _fresh(self, fault: str) -> tuple[pathlib.Path, pathlib.Path]:
        self.count[fault] += 1
        workdir = self.root / f"{fault}_{self.count[fault]}"
        return workdir, workdir.with_suffix(".log")

    def _resume_and_compare(self, fault: str, detail: str, workdir, log, *extra) -> Strike:
        """Resume the struck run to the end and compare it with the reference."""
        before = {s: _read_state(workdir, s) for s in _committed_steps(workdir)}
        damaged = [s for s, leaves in before.items() if leaves is None or not _finite(leaves)]
        rc = _finish(_start(_run_flags(self.data, workdir, self.steps, *extra), log))
        final = _read_state(workdir, self.steps)
        if rc != 0:
            return Strike(fault, detail, False, f"resume exited {rc}; see {log}")
        if not _equal(final, self.reference):
            return Strike(fault, detail, False, f"resumed run differs from the reference ({log})")
        kept = ",".join(map(str, sorted(before))) or "none"
        note = f"; unreadable before resume: {damaged}" if damaged else ""
        return Strike(fault, detail, True, f"resumed from [{kept}]{note}; equal bit for bit")

    def sigkill(self) -> Strike:
        """SIGKILL at a random moment: in start-up (1 in 5), or up to 1 s after a random save."""
        workdir, log = self._fresh("sigkill")
        process = _start(_run_flags(self.data, workdir, self.steps), log)
        if self.rng.random() < 0.2:
            delay = self.rng.uniform(0.0, self.first_checkpoint_s)
            time.sleep(delay)
            when = f"{delay:.1f} s into start-up"
        else:
            # The run's own progress, not the clock, picks the moment: a kill lands in a
            # step, a save or the final save, whatever the machine's load.
            target = self.rng.randrange(5, self.steps, 5)
            _wait_for_checkpoint(workdir, process, target)
            delay = self.rng.uniform(0.0, 1.0)
            time.sleep(delay)
            when = f"{delay:.2f} s after save {target} committed"
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        detail = f"{when}, committed {_committed_steps(workdir)[-1:] or 'none'}"
        return self._resume_and_compare("sigkill", detail, workdir, log)

    def sigterm(self) -> Strike:
        """SIGTERM at a random moment: the run must save, say how to resume, and exit."""
        workdir, log = self._fresh("sigterm")
        process = _start(_run_flags(self.data, workdir, self.steps), log)
        if not _wait_for_checkpoint(workdir, process, 1):
            return Strike("sigterm", "-", False, f"the run ended before its first save ({log})")
        # Within the step loop: its saves start with the first checkpoint.
        remaining = max(self.duration - self.first_checkpoint_s, 0.1)
        time.sleep(self.rng.uniform(0.0, 0.8 * remaining))
        if process.poll() is not None:
            return self._resume_and_compare("sigterm", "run had ended", workdir, log)
        sent = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        try:
            rc = process.wait(timeout=_TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            return Strike("sigterm", "-", False, f"still running {_TERM_GRACE_S} s after SIGTERM")
        took = time.perf_counter() - sent
        steps = _committed_steps(workdir)
        detail = f"exit {rc} after {took:.1f} s, saved {steps[-1:] or 'none'}"
        said_resume = "resume" in _log_text(log).lower()
        if rc == 0:
            if steps[-1:] != [self.steps]:
                return Strike("sigterm", detail, False, "exit code 0 for an unfinished run")
            return self._resume_and_compare("sigterm", f"{detail} (run had ended)", workdir, log)
        if rc < 0 and steps[-1:] == [self.steps]:
            # The signal came after the loop had saved the final step (the default handler
            # is back by then): nothing was left to save, so nothing was lost.
            detail += " (after the final save)"
            return self._resume_and_compare("sigterm", detail, workdir, log)
        if rc < 0 or not said_resume:
            return Strike("sigterm", detail, False, "killed by the signal, no save or message")
        return self._resume_and_compare("sigterm", detail, workdir, log)

    def nan(self) -> Strike:
        """A learning rate that diverges: the run stops, the last finite checkpoint stays."""
        workdir, log = self._fresh("nan")
        # Saves at every step, so that finite checkpoints exist before it diverges (step 3).
        extra = ("--config.train.learning_rate=1e6", "--config.train.checkpoint_every=1")
        rc = _finish(_start(_run_flags(self.data, workdir, self.steps, *extra), log))
        kept = _committed_steps(workdir)
        states = [_read_state(workdir, s) for s in kept]
        detail = f"exit {rc}, kept {kept}"
        if rc == 0:
            return Strike("nan", detail, False, "a diverged run exited 0")
        if any(s is None or not _finite(s) for s in states):
            return Strike("nan", detail, False, "a non-finite or unreadable checkpoint was kept")
        if "non-finite" not in _log_text(log):
            return Strike("nan", detail, False, "no message naming the non-finite step")
        return Strike("nan", detail, True, "stopped with a message; every kept checkpoint finite")

    def _damage(self, fault: str, damage) -> Strike:
        """Stop a run after a save in mid-run, damage its newest checkpoint, resume it."""
        workdir, log = self._fresh(fault)
        process = _start(_run_flags(self.data, workdir, self.steps), log)
        _wait_for_checkpoint(workdir, process, self.steps // 2)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        newest = _committed_steps(workdir)[-1]
        what = damage(workdir / "checkpoints" / str(newest))
        struck = self._resume_and_compare(fault, f"step {newest}: {what}", workdir, log)
        resumed_from = [line for line in _log_text(log).splitlines() if "esum" in line]
        named = f"Skipping the checkpoint of step {newest} " in _log_text(log)
        if struck.ok and not named:
            return Strike(fault, struck.detail, False, "resumed without naming the damage")
        if struck.ok:
            struck.outcome = f"named, skipped; {resumed_from[-1].strip()[:60]}; equal bit for bit"
        return struck

    def corrupt(self) -> Strike:
        """4 KB of random bytes in the largest file of the newest checkpoint's state."""

        def damage(folder: pathlib.Path) -> str:
            largest = max((p for p in folder.rglob("*") if p.is_file()), key=os.path.getsize)
            size = largest.stat().st_size
            offset = self.rng.randrange(max(size - 4096, 1))
            with largest.open("r+b") as f:
                f.seek(offset)
                f.write(self.rng.randbytes(min(4096, size)))
            return f"random bytes in {largest.relative_to(folder)}"

        return self._damage("corrupt", damage)

    def truncate(self) -> Strike:
        """The largest file of the newest checkpoint cut to half its length."""

        def damage(folder: pathlib.Path) -> str:
            largest = max((p for p in folder.rglob("*") if p.is_file()), key=os.path.getsize)
            os.truncate(largest, largest.stat().st_size // 2)
            return f"truncated {largest.relative_to(folder)}"

        return self._damage("truncate", damage)

    def missing_file(self) -> Strike:
        """A metadata file of the newest checkpoint deleted."""

        def damage(folder: pathlib.Path) -> str:
            names = ("manifest.ocdbt", "_METADATA", "process_0-of-1.json")
            victims = [p for p in folder.rglob("*") if p.is_file() and p.name in names]
            victim = self.rng.choice(victims)
            victim.unlink()
            return f"deleted {victim.relative_to(folder)}"

        return self._damage("missing_file", damage)

    def concurrent(self) -> Strike:
        """Two runs started in one workdir at once: one trains, the other is refused."""
        workdir, log = self._fresh("concurrent")
        logs = [log, workdir.with_suffix(".second.log")]
        first = _start(_run_flags(self.data, workdir, self.steps), logs[0])
        time.sleep(0.5)
        second = _start(_run_flags(self.data, workdir, self.steps), logs[1])
        runs = [first, second]
        codes = [_finish(first), _finish(second)]
        refused = [i for i in (0, 1) if codes[i] != 0]
        if len(refused) != 1:
            return Strike("concurrent", f"exits {codes}", False, "not exactly one run refused")
        loser, winner = refused[0], 1 - refused[0]
        message = (_log_text(logs[loser]).strip().splitlines() or [""])[-1]
        detail = f"run {loser + 1} exit {codes[loser]}: {message[:60]}"
        if f"PID {runs[winner].pid}" not in message:
            return Strike("concurrent", detail, False, "the refusal does not name the holder")
        if not _equal(_read_state(workdir, self.steps), self.reference):
            return Strike("concurrent", detail, False, "the training run's result differs")
        return Strike("concurrent", detail, True, "one refused naming the other; equal bit for bit")

    def disk_full(self) -> Strike:
        """The workdir on a small tmpfs that fills up during a save; then resumed elsewhere."""
        workdir, log = self._fresh("disk_full")
        reference = self.reference_dir
        checkpoint = sum(f.stat().st_size for f in (reference / "checkpoints").rglob("*"))
        per_checkpoint = checkpoint / max(len(_committed_steps(reference)), 1)
        rest = sum(
            f.stat().st_size
            for f in reference.rglob("*")
            if f.is_file() and "checkpoints" not in f.parts
        )
        size_kb = int((rest * 1.5 + per_checkpoint * 2.5) / 1024) + 64
        mount = self.root / "tmpfs"
        mount.mkdir(exist_ok=True)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)],
            capture_output=True,
        )
        if mounted.returncode != 0:
            return Strike("disk_full", "-", True, "skipped: cannot mount a tmpfs here")
        try:
            small = mount / "run"
            began = time.perf_counter()
            rc = _finish(_start(_run_flags(self.data, small, self.steps), log))
            took = time.perf_counter() - began
            leftovers = [p.name for p in (small / "checkpoints").iterdir() if "tmp" in p.name]
            kept = _committed_steps(small)
            text = _log_text(log)
            detail = f"{size_kb} KB, exit {rc} after {took:.0f} s, kept {kept}"
            if rc == 0:
                return Strike("disk_full", detail, False, "no error although the disk filled up")
            if "Traceback" in text or "No space left" not in text:
                return Strike("disk_full", detail, False, "no one-line message with the cause")
            if leftovers:
                return Strike("disk_full", detail, False, f"partial folders left: {leftovers}")
            shutil.copytree(small, workdir)
        finally:
            subprocess.run(["umount", str(mount)], check=False)
        return self._resume_and_compare("disk_full", detail, workdir, log)


def table(strikes: list[Strike]) -> str:
    """Markdown: per fault, how many strikes and how many ended well."""
    rows = ["| fault | count | outcome |", "| --- | --- | --- |"]
    for fault in dict.fromkeys(s.fault for s in strikes):
        mine = [s for s in strikes if s.fault == fault]
        good = sum(s.ok for s in mine)
        bad = [s.outcome for s in mine if not s.ok]
        skipped = [s.outcome for s in mine if s.outcome.startswith("skipped")]
        outcome = skipped[0] if skipped else f"{good}/{len(mine)} ok"
        if bad:
            outcome += "; failed: " + "; ".join(sorted(set(bad)))
        rows.append(f"| {fault} | {len(mine)} | {outcome} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The script's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma list of {FAULTS}")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs at random moments")
    parser.add_argument("--terms", type=int, default=5, help="SIGTERMs at random moments")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random moments")
    parser.add_argument("--steps", type=int, default=120, help="steps of each run")
    parser.add_argument("--keep", help="keep the runs in this folder (default: a temp dir)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen strikes, print one row each and the table; 1 if any went wrong."""
    args = parse_args(argv)
    logging.set_verbosity(logging.WARNING)
    faults = args.faults.split(",")
    unknown = set(faults) - set(FAULTS)
    if unknown:
        print(f"--faults: unknown {sorted(unknown)}; choose from {FAULTS}", file=sys.stderr)
        return 2
    root = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="faults_"))
    root.mkdir(parents=True, exist_ok=True)
    injector = Injector(root, args.steps, random.Random(args.seed))
    repeats = {"sigkill": args.kills, "sigterm": args.terms}
    strikes = []
    for fault in faults:
        for _ in range(repeats.get(fault, 1)):
            strike = getattr(injector, fault)()
            strikes.append(strike)
            mark = "ok  " if strike.ok else "FAIL"
            print(f"{mark} {fault:12s} {strike.detail:48s} {strike.outcome}", flush=True)
    print(f"\nruns in {root}\n\n{table(strikes)}")
    (root / "faults.json").write_text(json.dumps([dataclasses.asdict(s) for s in strikes]))
    return 0 if all(s.ok for s in strikes) else 1


if __name__ == "__main__":
    sys.exit(main())
