"""Stop signals: the loop is asked to stop, and the old handlers come back."""

import os
import pathlib
import signal

import pytest

from autocontext_jax.runtime import preemption

TESTS = pathlib.Path(__file__).parent


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_ask_the_loop_to_stop_and_leave_the_old_handlers_in_place(number):
    before = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    with preemption.StopSignals() as stop:
        assert not stop.stop_at(1)
        os.kill(os.getpid(), number)
        assert stop.stop_at(2) and stop.received == number
        # A second signal while the run saves interrupts at once.
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), number)
    assert {number: signal.getsignal(number) for number in before} == before
    assert preemption.StoppedBySignalError(2, number, "ckpt").exit_code == 128 + number
