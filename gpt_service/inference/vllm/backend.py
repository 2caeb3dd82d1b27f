"""Model names served by vLLM: one vLLM server per base model (and dtype), its adapters loaded at run time.

A name is a base alone or a base plus one LoRA adapter, as in the builtin registry. The first name
of a base starts its server (`--enable-lora`); each adapter is loaded into it through vLLM's
runtime LoRA API, after the same checks the builtin engine makes (the folder under models/,
safetensors only, trained on this base). Unloading a base's last name stops its server. A server
that dies is reported, and its names answer 503 with the reason, until a load on that base starts
a new one, which takes back every adapter the names still hold.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gpt_service.evaluation.generation import Question
from gpt_service.inference.engine import Event
from gpt_service.inference.errors import BackendConflict, BackendUnavailable, ModelExists, QueueFull
from gpt_service.inference.registry import _identity, check_adapter
from gpt_service.inference.sampling import SamplingParams
from gpt_service.inference.text import TextAssembler
from gpt_service.inference.vllm.client import VllmClient, completion_body
from gpt_service.inference.vllm.process import VllmProcess
from gpt_service.model_loading import load_tokenizer
from gpt_service.settings import ServiceSettings

log = logging.getLogger(__name__)
BASE_NAME = "base"  # what each vLLM server calls its base model; adapters are lora-1, lora-2, ...
SETUP_COMMAND = "bash scripts/setup-vllm.sh"


def vllm_python(settings: ServiceSettings) -> Path:
    """The configured vLLM interpreter, or .venv-vllm's beside this interpreter's virtualenv."""
    return settings.vllm_python or Path(sys.prefix).parent / ".venv-vllm" / "bin" / "python"


def vllm_command(settings: ServiceSettings, model_path: str, dtype: str, port: int, options: list[str]) -> list[str]:
    """The command line of a base's vLLM server: its OpenAI server on 127.0.0.1, LoRA on, our batch size."""
    return [str(vllm_python(settings)), "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
            "--served-model-name", BASE_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
            "--enable-lora", "--max-lora-rank", str(settings.vllm_max_lora_rank),
            "--max-loras", str(settings.vllm_max_loras), "--max-num-seqs", str(settings.max_batch_size),
            *settings.vllm_args, *options]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class VllmBase:
    source: str
    dtype: str
    options: list[str]  # the load's own engine flags it was started with
    tokenizer: Any
    process: VllmProcess
    client: VllmClient
    context_length: int = 0
    adapters: dict[str, str] = field(default_factory=dict)  # vLLM's LoRA name -> folder
    users: set[str] = field(default_factory=set)
    in_flight: int = 0  # requests sent to vLLM and not finished


@dataclass(frozen=True)
class VllmModel:
    name: str
    base: VllmBase
    lora: str | None  # vLLM's name for the adapter
    adapter_path: str | None

    @property
    def target(self) -> str:
        """The `model` of this name's requests to vLLM."""
        return self.lora or BASE_NAME

    def describe(self, max_running: int) -> dict[str, Any]:
        base, running = self.base, min(self.base.in_flight, max_running)
        return {"model_name": self.name, "base_model": base.source, "lora_adapter": self.adapter_path,
                "dtype": base.dtype, "shared_with": sorted(base.users - {self.name}), "running": running,
                "waiting": base.in_flight - running, "context_length": base.context_length,
                "vllm": {"pid": base.process.pid, "port": base.process.port, "alive": base.process.alive,
                         "log": str(base.process.log_path)}}


class _Flight:
    """One request's events; it holds its place in its base's count until they end, or it is closed or dropped."""

    def __init__(self, base: VllmBase, events: AsyncIterator[Event]) -> None:
        self.base, self.events, self.open = base, events, True
        base.in_flight += 1

    def _land(self) -> None:
        if self.open:
            self.open = False
            self.base.in_flight -= 1

    def __aiter__(self) -> _Flight:
        return self

    async def __anext__(self) -> Event:
        try:
            event = await self.events.__anext__()
        except BaseException:
            self._land()
            raise
        if event.finish_reason:
            self._land()
        return event

    async def aclose(self) -> None:
        self._land()
        await self.events.aclose()  # type: ignore[attr-defined]

    def __del__(self) -> None:
        self._land()


class VllmBackend:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self._bases: dict[tuple[str, str], VllmBase] = {}
        self._names: dict[str, VllmModel] = {}
        self._lock = threading.RLock()  # loads and unloads one at a time
        self._counter = 0
        self._http: httpx.AsyncClient | None = None  # made on the event loop, at the first request

    def get(self, name: str) -> VllmModel | None:
        return self._names.get(name)

    def list(self) -> list[VllmModel]:
        return list(self._names.values())

    def describe(self, model: VllmModel) -> dict[str, Any]:
        return model.describe(self.settings.max_batch_size)

    @property
    def alive(self) -> bool:
        return all(base.process.alive for base in self._bases.values())

    def failures(self) -> list[str]:
        """Why each dead vLLM server died, for /health."""
        return [base.process.failure() for base in self._bases.values() if not base.process.alive]

    def load(self, name: str, model_path: str, lora_adapter: str | None, dtype: str, replace: bool,
             options: list[str]) -> VllmModel:
        """Start (or reuse, or restart) the base's server and load the adapter into it; blocking."""
        with self._lock:
            if name in self._names and not replace:
                raise ModelExists(f"a model named {name!r} is already loaded; unload it or pass replace: true")
            if lora_adapter:
                check_adapter(Path(lora_adapter), model_path)
            key = (_identity(model_path), dtype)
            base = self._bases.get(key)
            if base is not None and base.process.alive and options and options != base.options:
                raise BackendConflict(
                    f"the vLLM server of {model_path} ({dtype}) already runs with {base.options or 'no options'}; "
                    f"unload its models ({', '.join(sorted(base.users))}) to start it with {options}")
            if base is None or not base.process.alive:
                base = self._start(model_path, dtype, options or (base.options if base else []), base)
            lora = self._add_adapter(base, lora_adapter) if lora_adapter else None
            previous = self._names.get(name)
            model = VllmModel(name, base, lora, lora_adapter)
            self._names[name] = model
            if previous is not None and previous.base is base:
                self._drop_adapter(base, previous.lora)
            elif previous is not None:
                self._forget(previous)
            base.users.add(name)
            log.info("loaded %s on vLLM (%s%s)", name, model_path, f" + {lora_adapter}" if lora_adapter else "")
            return model

    def unload(self, name: str) -> None:
        with self._lock:
            self._forget(self._names.pop(name))

    def close(self) -> None:
        with self._lock:
            for base in self._bases.values():
                base.process.stop()
            self._bases.clear()
            self._names.clear()

    def stream(self, model: VllmModel, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Event]:
        """Send one generation to vLLM now (BackendUnavailable and QueueFull are raised here); its events."""
        base = model.base
        if not base.process.alive:
            raise BackendUnavailable(base.process.failure())
        limit = self.settings.max_batch_size + self.settings.max_waiting_requests
        if base.in_flight >= limit:
            raise QueueFull(f"{base.in_flight} requests are already running or waiting for this model")
        if self._http is None:
            self._http = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        body = completion_body(model.target, prompt_ids, params)
        return _Flight(base, base.client.stream(self._http, body, TextAssembler(base.tokenizer, params.stop)))

    def greedy_answers(self, model: VllmModel, questions: list[Question], on_answer: Callable[[], None]) -> list[str]:
        """Each question's greedy answer from the model's vLLM server (a question without an adapter: from its
        base), at most max_batch_size at once; blocking, so call it off the event loop."""
        base = model.base
        if not base.process.alive:
            raise BackendUnavailable(base.process.failure())

        async def answer_all() -> list[str]:
            room = asyncio.Semaphore(self.settings.max_batch_size)
            async with httpx.AsyncClient() as http:

                async def one(question: Question) -> str:
                    target = model.target if question.adapter else BASE_NAME
                    params = SamplingParams(max_tokens=question.max_tokens, temperature=0.0)
                    async with room:
                        events = [event async for event in base.client.stream(
                            http, completion_body(target, question.prompt_ids, params),
                            TextAssembler(base.tokenizer, ()))]
                    if events[-1].error:
                        raise RuntimeError(events[-1].error)
                    on_answer()
                    return "".join(event.text for event in events)

                return list(await asyncio.gather(*(one(question) for question in questions)))

        return asyncio.run(answer_all())

    # -- the servers ---------------------------------------------------------------------------

    def _start(self, model_path: str, dtype: str, options: list[str], dead: VllmBase | None) -> VllmBase:
        """A new server for the base, with the adapters of a dead one (its names keep them) loaded again."""
        python = vllm_python(self.settings)
        if not python.is_file():
            raise BackendUnavailable(f"no vLLM interpreter at {python}: run `{SETUP_COMMAND}`, or set "
                                     "GPT_SERVICE_VLLM_PYTHON to the python of a virtualenv that has vLLM")
        port = _free_port()
        command = vllm_command(self.settings, model_path, dtype, port, options)
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        if not self.settings.allow_downloads:
            env["HF_HUB_OFFLINE"] = "1"
        log_path = self.settings.workspace / "logs" / f"vllm-{Path(model_path).name}-{port}.log"
        process = VllmProcess(command, env, port, log_path, f"{model_path} ({dtype})")
        tokenizer = dead.tokenizer if dead else load_tokenizer(model_path, self.settings.allow_downloads)
        process.start(self.settings.vllm_start_timeout)
        base = VllmBase(model_path, dtype, options, tokenizer, process, VllmClient(process.url))
        try:
            base.context_length = base.client.context_length(BASE_NAME)
            for lora, folder in (dead.adapters if dead else {}).items():
                base.client.load_adapter(lora, folder)
                base.adapters[lora] = folder
        except Exception:
            process.stop()
            raise
        if dead:
            base.users = dead.users
            for name in base.users:  # the names move to the new server
                old = self._names[name]
                self._names[name] = VllmModel(name, base, old.lora, old.adapter_path)
        self._bases[(_identity(model_path), dtype)] = base
        return base

    def _add_adapter(self, base: VllmBase, folder: str) -> str:
        self._counter += 1
        lora = f"lora-{self._counter}"
        base.client.load_adapter(lora, folder)
        base.adapters[lora] = folder
        return lora

    def _forget(self, model: VllmModel) -> None:
        """Drop a name: its adapter leaves vLLM, and its base's server stops when no name is left."""
        base = model.base
        base.users.discard(model.name)
        if not base.users:
            self._bases.pop((_identity(base.source), base.dtype), None)
            base.process.stop()
        else:
            self._drop_adapter(base, model.lora)

    @staticmethod
    def _drop_adapter(base: VllmBase, lora: str | None) -> None:
        if lora and base.adapters.pop(lora, None) and base.process.alive:
            base.client.unload_adapter(lora)
