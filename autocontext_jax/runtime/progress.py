"""What training tells the user: a start block, a bar of completed steps, the time spent.

The train step runs asynchronously: the host dispatches steps far ahead of the device.
A bar advanced at dispatch runs in bursts and shows a rate the device never had, so this
bar only moves to a step the loop has waited for anyway (a log step, a save). The first
step compiles; it is waited for once and timed, and the bar starts after it, so neither
its rate nor its ETA contains the compilation. The rate is the average since then
(tqdm's `smoothing=0`), which spreads the saves and validations over the steps as they
will recur.
"""

from __future__ import annotations

import pathlib
import sys
import time
from collections.abc import Sequence

import jax
import ml_collections
import tqdm

from autocontext_jax.data.sampling import downsample_factor
from autocontext_jax.models.init import count_parameters
from autocontext_jax.models.pyramid import AutoContextPyramid


def interactive() -> bool:
    """Whether standard error is a terminal, where a progress bar may redraw itself.

    Captured in a file or a pipe, a bar's redraws leave carriage returns and, for nested
    bars, cursor-movement codes in the log; the commands print a line per case instead.
    """
    return sys.stderr.isatty()


def say(message: str) -> None:
    """Tell the user (process 0 only); absl logging is left to library chatter."""
    if jax.process_index() == 0:
        print(message, flush=True)


def parameter_lines(model: AutoContextPyramid, params: dict) -> list[str]:
    """One line per pyramid level (downsampling, input channels, parameters), then the total."""
    lines = []
    for level in range(1, model.num_levels + 1):
        count = count_parameters(params[f"level_{level}"])
        factor = downsample_factor(level, model.num_levels)
        channels = model.level_in_channels(level)
        lines.append(
            f"level {level}: downsample x{factor}, {channels} input channel"
            f"{'s' if channels > 1 else ''}, {count:,} parameters ({count / 1e6:.2f} M)"
        )
    total = count_parameters(params)
    lines.append(f"total: {total:,} parameters ({total / 1e6:.2f} M)")
    return lines


def device_line(devices: Sequence[jax.Device] | None = None) -> str:
    """The devices the run computes on, their platform, and the number of processes."""
    devices = jax.devices() if devices is None else devices
    kinds = sorted({device.device_kind for device in devices})
    processes = jax.process_count()
    return (
        f"{len(devices)} {devices[0].platform} device{'s' if len(devices) != 1 else ''} "
        f"({', '.join(kinds)}), platform {jax.default_backend()}"
        + (f", {processes} processes" if processes > 1 else "")
    )


def start_block(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    model: AutoContextPyramid,
    params: dict,
    train_cases: int,
    held_out_cases: int,
    start_step: int,
    validating: bool,
    convolution: str = "",
) -> str:
    """The block training prints before its first step: devices, model, data, workdir.

    `convolution` says which lowering of the convolution runs and why (`autotune.Lowering`).
    """
    validation = "no validation during training"
    if validating and config.eval.every > 0 and held_out_cases > 0:
        cases = min(config.eval.num_cases, held_out_cases)
        validation = (
            f"validation every {config.eval.every} steps on {cases} of them"
            if cases < held_out_cases
            else f"validation every {config.eval.every} steps on all of them"
        )
    fold = ""
    if config.data.fold >= 0:
        fold = f" by fold {config.data.fold} of {config.data.num_folds}"
    steps = f"{config.train.steps} steps of batch {config.train.batch_size}"
    if start_step >= config.train.steps:
        steps += f", all done (the checkpoint of step {start_step})"
    elif start_step:
        steps += f", resuming after step {start_step}"
    lines = [
        f"Training in {workdir}",
        f"  devices: {device_line()}",
        *([f"  convolution: {convolution}"] if convolution else []),
        "  parameters:",
        *(f"    {line}" for line in parameter_lines(model, params)),
        f"  cases: {train_cases} training, {held_out_cases} held out{fold} ({validation})",
        f"  steps: {steps}",
    ]
    return "\n".join(lines)


class StepProgress:
    """The progress bar of the steps completed on the device, and the time spent.

    `compiled(step)` after waiting for the first step; `completed(step)` where the loop
    has waited for `step`; `validated(seconds)` after each validation.
    """

    def __init__(self, total: int, start_step: int) -> None:
        """Say that the first step compiles; the bar appears once it has run."""
        self.total, self.start_step = total, start_step
        self.enabled = jax.process_index() == 0
        self.bar: tqdm.tqdm | None = None
        self.compile_seconds = 0.0
        self.validation_seconds = 0.0
        self._start = time.perf_counter()
        if start_step < total:
            say("  compiling the train step ...")

    def compiled(self, step: int) -> None:
        """The first step (with its compilation) has run: report its time, start the bar."""
        self.compile_seconds = time.perf_counter() - self._start
        say(f"  compiled and ran the first step in {self.compile_seconds:.1f} s")
        self.bar = tqdm.tqdm(
            total=self.total,
            initial=step,
            desc="train",
            disable=not self.enabled,
            dynamic_ncols=True,
            smoothing=0,
        )

    def completed(self, step: int) -> None:
        """Move the bar to `step`, which the device has finished."""
        if self.bar is not None and step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def set_postfix(self, postfix: dict[str, str]) -> None:
        """Show the latest logged values beside the bar."""
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)

    def validated(self, seconds: float, line: str) -> None:
        """Count a validation's time and print its line, with the time, above the bar."""
        self.validation_seconds += seconds
        if self.enabled and line:
            tqdm.tqdm.write(f"{line} ({seconds:.1f} s)")

    def close(self, step: int | None) -> None:
        """Close the bar and, for a run that reached `step` (None: it stopped on an error),
        say how the time went."""
        if self.bar is not None:
            self.bar.close()
        if step is None or step <= self.start_step:
            return
        total = time.perf_counter() - self._start
        line = (
            f"Trained steps {self.start_step + 1} to {step} in {total:.0f} s: "
            f"{self.compile_seconds:.0f} s compiling and the first step"
        )
        if self.validation_seconds:
            share = 100 * self.validation_seconds / total
            line += f", {self.validation_seconds:.0f} s validating ({share:.1f} %)"
        say(line)
