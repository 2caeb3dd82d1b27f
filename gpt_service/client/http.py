"""A small HTTP client for the service: base URL, Bearer key, errors as `ClientError`s."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import httpx

from gpt_service.client.environment import URL_ENV
from gpt_service.client.errors import ServiceError, Unreachable, UsageError

CONNECT_TIMEOUT = 10.0


def error_message(response: httpx.Response) -> str:
    """What the service said went wrong: `detail`, OpenAI's `error.message`, or the body as text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    if isinstance(body, dict):
        detail, error = body.get("detail"), body.get("error")
        if isinstance(detail, str):
            return detail
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if detail is not None:
            return json.dumps(detail, ensure_ascii=False)
    return response.text.strip()


def check_url(text: str) -> None:
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise UsageError(f"--url {text!r} is not a URL ({exc}); give it as http://HOST:PORT") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise UsageError(f"--url {text!r} is not an http(s) URL; give it as http://HOST:PORT")


class ApiClient:
    """`with ApiClient(url, key) as api: api.call("GET", "/models")` → the decoded JSON answer."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        check_url(self.base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers,
                                  timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT)))

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._http.close()

    def call(self, method: str, path: str, *, body: dict[str, Any] | None = None,
             params: dict[str, Any] | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=body, params=params)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.is_error:
            raise ServiceError(response.status_code, error_message(response))
        return response.json()

    def events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST `body` and yield each server-sent event's JSON payload as it arrives, up to `[DONE]`."""
        try:
            with self._http.stream("POST", path, json=body) as response:
                if response.is_error:
                    response.read()
                    raise ServiceError(response.status_code, error_message(response))
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line.removeprefix("data:").strip()
                    if data == "[DONE]":
                        return
                    yield json.loads(data)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: httpx.TransportError) -> Unreachable:
        if isinstance(exc, httpx.TimeoutException):
            return Unreachable(f"the service at {self.base_url} did not answer in time ({type(exc).__name__}); "
                               "--timeout SECONDS waits longer")
        reason = str(exc) or type(exc).__name__
        return Unreachable(f"cannot reach the service at {self.base_url}: {reason} (is `gpt-service serve` "
                           f"running there? --url or {URL_ENV} names another)")

