"""runtime/memory.py: freed large blocks kept for the next step, and not a value changed."""

import json
import platform
import subprocess
import sys

import pytest
from conftest import REPO, run_autocontext

from autocontext_jax.cli import common

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the policy is glibc's malloc's; elsewhere keep_freed_memory changes nothing",
)

# Allocates and fills a 64 MiB block with malloc three times, as XLA's CPU runtime
# allocates a step's temporaries (numpy would ask for huge pages), and prints the minor
# page faults of the third time; keeps freed memory first if asked.
FAULTS = """
import ctypes, ctypes.util, resource, sys
from autocontext_jax.runtime.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(2**26)
    ctypes.memset(block, 1, 2**26)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
print(faults)
"""


def _python(program: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", program, *args], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_a_freed_large_block_is_reused_without_page_faults():
    # glibc's default maps a block this large anew each time: one fault per 4 KiB page.
    assert int(_python(FAULTS, "default")) > 10_000
    assert int(_python(FAULTS, "keep")) < 1_000


# Two steps of the tiny pyramid on a fixed batch: the losses, and every gradient's sum of
# squares after the first step, printed as exact float32 bit patterns.
STEP = """
import json, sys
import jax, numpy as np
from conftest import fixed_batch, make_tiny_config
from autocontext_jax.models import build_pyramid
from autocontext_jax.runtime.memory import keep_freed_memory
from autocontext_jax.training.state import create_train_state, make_optimizer
from autocontext_jax.training.step import make_train_step
if sys.argv[1] == "keep":
    assert keep_freed_memory()
config = make_tiny_config()
model = build_pyramid(config)
optimizer = make_optimizer(config.train)
state = create_train_state(model, optimizer, 0)
step = jax.jit(make_train_step(model, optimizer, config))
batch, rng = fixed_batch(config), jax.random.key(0)
losses = []
for _ in range(2):
    state, metrics = step(state, batch, rng)
    losses.append(np.float32(metrics["loss"]).view(np.uint32).item())
norms = [np.float32(np.sum(np.square(leaf))).view(np.uint32).item()
         for leaf in jax.tree.leaves(state.params)]
print(json.dumps({"losses": losses, "parameters": norms}))
"""


@pytest.mark.slow
def test_keeping_freed_memory_leaves_the_pyramid_step_bit_for_bit():
    program = f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n" + STEP
    default = json.loads(_python(program, "default"))
    kept = json.loads(_python(program, "keep"))
    assert kept == default
    assert len(default["parameters"]) > 10


def test_the_computing_commands_keep_freed_memory_before_jax_starts(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(common, "keep_freed_memory", lambda: calls.append(True) or True)
    # A command that computes, stopped by a user error once started: the policy came first.
    result = run_autocontext("predict", f"--workdir={tmp_path}", "--input=x", "--output=y")
    assert result.returncode == 1 and calls == [True]
    # --help and --version never start.
    run_autocontext("predict", "--help")
    assert calls == [True]
