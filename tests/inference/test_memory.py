"""Free memory respects a container's cgroup limit, v2 or v1."""

from __future__ import annotations

from pathlib import Path

from gpt_service.memory import cgroup_room


def test_cgroup_v2_limit(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("400000\n")
    assert cgroup_room(tmp_path) == 600000


def test_cgroup_v2_without_a_limit(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("400000\n")
    assert cgroup_room(tmp_path) is None


def test_cgroup_v1_limit(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("2000\n")
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text("500\n")
    assert cgroup_room(tmp_path) == 1500
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1's "no limit"
    assert cgroup_room(tmp_path) is None
