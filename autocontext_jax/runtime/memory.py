"""Host memory: large blocks that a step frees are kept for the next step, not unmapped.

XLA's CPU runtime allocates every execution's temporaries anew (the paper pyramid's train
step: 4.3 GB) and frees them at its end. glibc's malloc serves blocks that large with
mmap and returns them with munmap, so each step touches all of that memory fresh: on the
2-core development CPU, about 520,000 minor page faults per step of one paper-size U-Net
level and 952,000 per pyramid step, and a pyramid step that cost 1.01 to 1.10 times its
two levels from one run to the next (docs/performance.md). Served from the heap and never
trimmed, the same blocks are reused by the next step: no page faults after the first,
the paper-size steps 6-19 % faster, and the pyramid at 0.99 and 1.02 times the sum of its
levels in two runs.

Only the allocator's policy changes, never a value: XLA places its buffers at the same
alignment either way. The cost is that the process keeps its peak heap until it exits,
which a training or inference process reaches again at every step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# No block served by mmap; the heap's top never given back (-1 turns trimming off); one
# arena, since a thread's own arena serves a block larger than its 64 MiB heaps with mmap
# whatever M_MMAP_MAX says.
_SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1))


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed large blocks for reuse (module docstring).

    Call it once, before JAX starts its backends, so that XLA's threads share the one
    arena. True where it applied: Linux with glibc; elsewhere (macOS, musl) nothing changes.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in _SETTINGS)
