"""Paths named in requests, confined to their roots.

A path is resolved (symlinks included) before it is compared with its root, so `../`, absolute
paths and links that point out are all refused before anything is opened or created.
"""

from __future__ import annotations

from pathlib import Path

from gpt_service.errors import UserError

MAX_NAME_BYTES = 255


class PathOutsideRoot(UserError):
    """A requested path that resolves outside the folder it must stay in."""


def check_path_text(raw: str, what: str) -> None:
    """Refuse what no file name should hold, before the path reaches the file system."""
    if "\x00" in raw:
        raise UserError(f"{what} contains a NUL byte")
    if "\\" in raw:
        raise UserError(f"{what} contains a backslash; use / between folders")
    if any(len(part.encode()) > MAX_NAME_BYTES for part in Path(raw).parts):
        raise UserError(f"{what} has a name longer than {MAX_NAME_BYTES} bytes")


def confine(raw: str, workspace: Path, root: Path, what: str) -> Path:
    """`raw` (relative to the workspace, or absolute) resolved; it must lie under `root`."""
    check_path_text(raw, what)
    resolved = (workspace / raw).resolve()  # an absolute raw replaces the workspace
    if not resolved.is_relative_to(root.resolve()):
        rel_root = root.relative_to(workspace) if root.is_relative_to(workspace) else root
        raise PathOutsideRoot(f"{what} {raw!r} is outside {rel_root}/; give a path under {rel_root}/")
    return resolved
