"""Where the client finds the service and its key when the command line does not say."""

from __future__ import annotations

import os

URL_ENV = "GPT_SERVICE_URL"
KEY_ENV = "GPT_SERVICE_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"


def env_url() -> str | None:
    return os.environ.get(URL_ENV) or None


def env_key() -> str | None:
    return os.environ.get(KEY_ENV) or None
