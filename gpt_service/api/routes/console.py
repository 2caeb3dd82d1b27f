"""The web console: the page at `/`, its static files under `/console/`, and the lists its forms need.

The page and its assets hold no data, so they are served without the API key; everything the
page shows comes from the API, called with the key the user types in (kept in the browser).
`/files/datasets` and `/files/models` list what a training or a load may name, read-only and
confined to the data and models roots: links are never followed out of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from gpt_service.api.responses import errors
from gpt_service.api.routes.training import Settings, Store, existing_task

CONSOLE_DIR = Path(__file__).resolve().parent.parent.parent / "console"
DATASET_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".txt": "txt"}
MAX_ENTRIES = 2000  # a list the form can show; a larger tree is cut, and says so
MAX_DEPTH = 8

router = APIRouter()


@router.get("/", include_in_schema=False)
def console_page() -> FileResponse:
    return FileResponse(CONSOLE_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def _shown(path: Path, workspace: Path) -> str:
    """A path as requests name it: relative to the workspace when it lies inside, else absolute."""
    return str(path.relative_to(workspace)) if path.is_relative_to(workspace) else str(path)


def _walk(root: Path) -> Any:
    """(folder, subfolder names, file names) under `root`, links to folders not followed, hidden names skipped."""
    root = root.resolve()
    if not root.is_dir():
        return
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        depth = len(here.relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and depth < MAX_DEPTH)
        yield here, dirs, sorted(f for f in files if not f.startswith("."))


def _inside(path: Path, root: Path) -> bool:
    """`path` (links resolved) still lies under `root`: a link pointing out is left out."""
    try:
        return path.resolve(strict=True).is_relative_to(root.resolve())
    except OSError:
        return False


@router.get("/files/datasets", tags=["files"])
def list_datasets(settings: Settings) -> dict[str, Any]:  # type: ignore[valid-type]
    """Regular .json, .jsonl and .txt files under the data root, as `dataset_path` takes them."""
    root: Path = settings.data_root  # type: ignore[attr-defined]
    workspace: Path = settings.workspace  # type: ignore[attr-defined]
    found: list[dict[str, Any]] = []
    truncated = False
    for folder, _dirs, files in _walk(root):
        for name in files:
            path = folder / name
            fmt = DATASET_SUFFIXES.get(path.suffix.lower())
            if fmt is None or not _inside(path, root) or not path.is_file():
                continue
            if len(found) >= MAX_ENTRIES:
                truncated = True
                break
            found.append({"path": _shown(path, workspace), "format": fmt, "size_bytes": path.stat().st_size})
    return {"root": _shown(root.resolve(), workspace), "datasets": found, "truncated": truncated}


def _adapter_base(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return base if isinstance(base, str) else None


@router.get("/files/models", tags=["files"])
def list_model_folders(settings: Settings) -> dict[str, Any]:  # type: ignore[valid-type]
    """Model folders (holding config.json) and LoRA adapters (holding adapter_config.json) under the models root."""
    root: Path = settings.models_root  # type: ignore[attr-defined]
    workspace: Path = settings.workspace  # type: ignore[attr-defined]
    models: list[dict[str, Any]] = []
    adapters: list[dict[str, Any]] = []
    truncated = False
    for folder, dirs, files in _walk(root):
        if len(models) + len(adapters) >= MAX_ENTRIES:
            truncated = True
            break
        if not _inside(folder, root):
            dirs[:] = []
            continue
        if "adapter_config.json" in files:
            adapters.append({"path": _shown(folder, workspace), "base_model": _adapter_base(folder),
                             "checkpoint": folder.name.startswith("checkpoint-")})
            dirs[:] = []
        elif "config.json" in files:
            models.append({"path": _shown(folder, workspace)})
            dirs[:] = []
    return {"root": _shown(root.resolve(), workspace), "models": models, "adapters": adapters,
            "truncated": truncated}


@router.get("/train/{task_id}/config", tags=["training"], responses=errors(404))
def task_config(task_id: str, store: Store) -> dict[str, Any]:  # type: ignore[valid-type]
    """The full parameters a task runs with (a training's config, or an evaluation's job)."""
    task = existing_task(task_id, store)  # type: ignore[arg-type]
    return {"task_id": task_id, "kind": task.kind, "config": task.request or {}}


class _ConsoleFiles(StaticFiles):
    """The console's assets, revalidated on every load so an upgraded server is seen at once."""

    def file_response(self, *args: Any, **kwargs: Any) -> Any:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def install(app: FastAPI) -> None:
    """Add the console page, its assets and its lists to `app`."""
    app.include_router(router)
    app.mount("/console", _ConsoleFiles(directory=CONSOLE_DIR), name="console")

