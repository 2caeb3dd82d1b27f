"""The memory allocator training processes run with: tcmalloc where it is installed, else glibc's.

A training step allocates and frees tensors of a few to a few tens of megabytes thousands of times.
glibc's malloc serves those below its mmap threshold (which raises itself up to 32 MB) from its
heap, and the holes they leave cannot go back to the system: on the 0.5B-shaped memory benchmark
with checkpointing (`bench/train_memory.py`) the peak RSS is 2.8 GB under glibc and 2.2 GB under
tcmalloc, whose size classes reuse freed blocks. Lowering glibc's threshold gives the memory back
too, but every allocation is then zero-filled by the kernel afresh (18 M page faults a run, 30%
slower). tcmalloc must be in the process before its first allocation, so it is preloaded:
`preloaded_environment` for the processes we start (the worker's task runner; torchrun's ranks
inherit it), `run_with_allocator` for a command started by hand, which runs itself again once
with it. `GPT_SERVICE_MALLOC=system` keeps glibc's malloc.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from gpt_service.errors import UserError

SETTING = "GPT_SERVICE_MALLOC"  # "tcmalloc" (the default) or "system"
_LIBRARY = "tcmalloc_minimal"  # Debian/Ubuntu: libtcmalloc-minimal4; RHEL: gperftools-libs
_RERUN = "GPT_SERVICE_MALLOC_RERUN"  # set on the second run, so that a preload that fails cannot loop
_DECOMMIT = b"tcmalloc.aggressive_memory_decommit"
# tcmalloc reports every allocation above 1 GB on stderr by default: a model's weights are such allocations.
_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 62)}


def wanted_library(env: Mapping[str, str] = os.environ) -> str | None:
    """The allocator library to preload (as the dynamic loader finds it), or None for glibc's malloc."""
    setting = env.get(SETTING, "tcmalloc").strip().lower()
    if setting == "system":
        return None
    if setting != "tcmalloc":
        raise UserError(f"{SETTING} must be 'tcmalloc' or 'system', not {env[SETTING]!r}")
    return ctypes.util.find_library(_LIBRARY)


def in_use() -> str:
    """The allocator of this process: 'tcmalloc' when its library is mapped, else 'glibc'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return "tcmalloc" if f"lib{_LIBRARY}" in maps else "glibc"


def preloaded_environment(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`env` with the allocator preloaded (unchanged where there is none, or it is already there)."""
    library = wanted_library(env)
    out = dict(env)
    if library is None or library in env.get("LD_PRELOAD", ""):
        return out
    out["LD_PRELOAD"] = " ".join(filter(None, [library, env.get("LD_PRELOAD", "")]))
    return {**_QUIET, **out}


def run_with_allocator() -> None:
    """Run this command again, in this process (same pid), with the allocator preloaded; return if
    it already is, there is none, or this is already the second run."""
    if not sys.platform.startswith("linux") or os.environ.get(_RERUN) or in_use() != "glibc":
        return
    try:
        env = preloaded_environment()
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if env.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**env, _RERUN: "1"})


@contextlib.contextmanager
def freed_memory_returned() -> Iterator[None]:
    """Within: tcmalloc gives freed memory back to the system at once, as glibc does for large blocks.

    For one-time phases such as loading a model, whose large buffers (weights before quantization or
    conversion) are not needed again: kept for reuse they would raise the peak. In
    the training steps, reuse is what saves the kernel's zero-filling of fresh pages, so it ends here.
    """
    extension = _tcmalloc_extension()
    if extension is not None:
        extension.MallocExtension_SetNumericProperty(_DECOMMIT, 1)
    try:
        yield
    finally:
        if extension is not None:
            extension.MallocExtension_SetNumericProperty(_DECOMMIT, 0)
            extension.MallocExtension_ReleaseFreeMemory()


def _tcmalloc_extension() -> ctypes.CDLL | None:
    """tcmalloc's C API, where it is this process's allocator."""
    if in_use() != "tcmalloc":
        return None
    library = ctypes.CDLL(None)  # the preloaded library's symbols are the process's
    library.MallocExtension_SetNumericProperty.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    return library
