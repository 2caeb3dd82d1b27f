"""Memory this process may still use: the machine's available memory, bounded by its cgroup's limit."""

from __future__ import annotations

import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (cgroup v2) means no limit


def cgroup_room(root: Path = CGROUP) -> int | None:
    """Bytes left under this container's memory limit (cgroup v2, else v1), or None without a limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, usage = _read_int(root / limit_file), _read_int(root / usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes a huge number for none
            return max(0, limit - usage)
    return None


def machine_available() -> int:
    """Bytes of memory available on the machine (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def free_memory() -> int:
    """Bytes this process can still take: the machine's available memory or the container's room, the smaller."""
    room = cgroup_room()
    available = machine_available()
    return available if room is None else min(available, room)
