"""Where a model comes from: a local folder or, when allowed, a hub id. No torch here.

Safe by default: weights from safetensors only, no network unless downloads are allowed
(`GPT_SERVICE_ALLOW_DOWNLOADS=1`). Offline, a hub id that is not cached fails at once instead of
retrying for half a minute.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from gpt_service.errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelSourceError(UserError):
    """A model that cannot be found or may not be loaded; the message says what to do."""


def downloads_allowed() -> bool:
    return os.environ.get("GPT_SERVICE_ALLOW_DOWNLOADS", "").lower() in {"1", "true", "yes"}


def check_local_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path} is a folder but has no config.json: it is not a model folder")
    if not any(path.glob("*.safetensors")):
        raise ModelSourceError(
            f"{path} has no .safetensors weights; pickle weights (.bin, .pt) are refused because "
            "loading them can run code. Convert the model to safetensors first"
        )


def resolve_model_source(name_or_path: str, allow_downloads: bool | None = None) -> tuple[str, bool]:
    """(what to pass to from_pretrained, local_files_only), or a ModelSourceError saying why not."""
    allow = downloads_allowed() if allow_downloads is None else allow_downloads
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        check_local_model_dir(path)
        return str(path), True
    if not HUB_ID.match(name_or_path):
        raise ModelSourceError(f"model {name_or_path!r} is neither a local folder nor a hub id (org/name)")
    if allow:
        return name_or_path, False
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return name_or_path, True
    raise ModelSourceError(
        f"model {name_or_path!r} is not a local folder and not in the Hugging Face cache, and hub "
        "downloads are off; set GPT_SERVICE_ALLOW_DOWNLOADS=1 to fetch it, or give a local model folder"
    )
