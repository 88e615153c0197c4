"""Stopping a run cleanly when the cluster asks: SIGTERM or SIGINT end it after the current step.

SLURM, Kubernetes and preemptible VMs send SIGTERM some seconds before they kill a job. In
a single process a handler records the signal and the loop, which asks `stop_at(step)`
after every step, saves that step and stops. In a run of several processes the handler is
JAX's: `jax.distributed.initialize` starts its preemption service, which catches SIGTERM on
any process and lets every process agree on one step to stop at
(`multihost_utils.reached_preemption_sync_point`); a local flag there would stop one
process alone and leave the others waiting in a collective, so SIGINT keeps its default.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

import jax
from jax.experimental import multihost_utils


class StoppedBySignalError(Exception):
    """The run stopped at `step` on a signal, after saving that step's checkpoint."""

    def __init__(self, step: int, signal_number: int, checkpoint: str) -> None:
        self.step = step
        self.signal_number = signal_number
        self.checkpoint = checkpoint
        super().__init__(
            f"stopped at step {step} on {signal.Signals(signal_number).name}; the checkpoint "
            f"of step {step} is saved in {checkpoint}"
        )

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process a signal ended (143, 130)."""
        return 128 + self.signal_number


class StopSignals:
    """While entered, SIGTERM and SIGINT ask the loop to stop after the current step.

    Leaving restores the handlers that were there before. A second signal while stopping
    interrupts at once (KeyboardInterrupt), for a save that hangs.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _signals(self) -> tuple[int, ...]:
        # Signal handlers can only be set from the main thread; several processes stop
        # through JAX's preemption service instead (see the module docstring).
        if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
            return ()
        return (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> StopSignals:
        for number in self._signals():
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = number

    def stop_at(self, step: int) -> bool:
        """Whether the run stops after `step`: a signal came, or all processes reached
        JAX's preemption sync point (called at every step by every process)."""
        if self.received is not None:
            return True
        try:
            reached = multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # jax_enable_preemption_service turned off: no sync point
            return False
        if reached:
            self.received = signal.SIGTERM
        return reached
