"""Service settings: flags > environment (`GPT_SERVICE_*`) > `.env` > defaults.

Built by `load_settings()`, never at import time, so tests and several servers can differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPT_SERVICE_", env_file=".env", extra="ignore")

    workspace: Path = Field(default_factory=Path.cwd, description="Root of relative request paths.")
    data_dir: Path | None = Field(None, description="Datasets are read only under here (default: workspace/data).")
    models_dir: Path | None = Field(
        None, description="Models are loaded and outputs written only under here (default: workspace/models)."
    )
    database_url: str | None = Field(None, description="SQLAlchemy URL (default: SQLite in the workspace).")
    config_path: Path | None = Field(None, description="Training defaults (default: workspace/config/models.yaml).")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535)
    api_key: SecretStr | None = Field(None, description="When set, every route but /health needs this Bearer key.")
    max_concurrent_tasks: int = Field(1, ge=1, le=64, description="Trainings run at once.")
    auto_resume: bool = Field(True, description="Re-queue tasks a server restart interrupted.")
    allow_downloads: bool = Field(False, description="Fetch hub ids that are not in the local cache.")
    evaluate_task_threshold: int = Field(
        200, ge=0, description="An evaluation of more samples than this runs as a task in the training queue; "
        "a smaller one answers at once."
    )
    cancel_grace_seconds: float = Field(10.0, gt=0, description="A cancelled training gets this long to stop.")
    lease_seconds: float = Field(
        60.0, gt=0, description="A worker's claim on a task lasts this long unless renewed; a task whose lease "
        "expired (its worker died or lost the database) is taken again by another worker."
    )
    lease_renew_seconds: float = Field(10.0, gt=0, description="How often a worker renews its leases.")
    max_reclaims: int = Field(3, ge=0, description="Times a task is taken again after a lost lease before it fails.")
    worker_name: str | None = Field(
        None, max_length=128, description="This worker's name, its identity across restarts, unique among the "
        "workers on one database (default: the host name, or host-pid when another live worker here has it)."
    )
    worker_device: str | None = Field(None, pattern="^(cpu|cuda)$", description="Device kind offered (default: found).")
    worker_device_count: int | None = Field(None, ge=1, description="Devices offered (default: found).")
    worker_memory_gb: float | None = Field(None, gt=0, description="Memory per device offered (default: found).")
    malloc: str = Field("tcmalloc", pattern="^(tcmalloc|system)$", description="The memory allocator of "
                        "training processes: tcmalloc where installed (a lower peak, see training/allocator.py), "
                        "or glibc's (system).")
    log_tail_lines: int = Field(1000, ge=10, description="Log lines kept per task.")
    serve_dtype: str = Field("auto", pattern="^(auto|float32|bfloat16|float16)$",
                             description="Serving precision; auto = bf16 where the hardware has it.")
    max_batch_size: int = Field(64, ge=1, le=1024, description="Sequences generated together per base model.")
    fast_paths: bool = Field(True, description="The engine's own forward over the paged KV cache for Llama-style "
                             "models (packed bf16 weights, batched LoRA rows); false runs the model's own forward "
                             "over a contiguous cache, for diagnosis.")
    cpu_kernels: bool = Field(True, description="On CPU, the paged forward's decode attention (read from the KV "
                              "cache in place), RMSNorm and rotary embedding run as C++ operators, built on first "
                              "load with the machine's compiler (inference/cpu_kernels.py); false, or no compiler: "
                              "PyTorch's operators.")
    kv_cache_gb: float | None = Field(None, gt=0, description="The KV cache pool per base model, in GiB (default: a "
                                      "quarter of the memory free at load, container limits respected, at most 4).")
    kv_block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV cache block.")
    max_batched_tokens: int = Field(512, ge=1, description="Tokens fed per engine step: the budget that long "
                                    "prompts are prefilled in chunks of, between decode steps.")
    chunked_prefill: bool = Field(True, description="Prefill long prompts in chunks between decode steps.")
    prefix_caching: bool = Field(True, description="Reuse the KV cache blocks of identical prompt prefixes "
                                 "(same base, same adapter) across requests.")
    max_waiting_requests: int = Field(256, ge=1, description="Requests queued per base model; past it, 429.")
    serving_backend: str = Field("builtin", pattern="^(builtin|vllm)$", description="What serves a model that "
                                 "/models/load names without a backend: our engine, or a vLLM server per base.")
    vllm_python: Path | None = Field(None, description="The Python of a virtualenv with vLLM (default: "
                                     ".venv-vllm/bin/python beside this one's, as scripts/setup-vllm.sh makes it).")
    vllm_args: list[str] = Field(default_factory=list, description="Extra arguments for every vLLM server, e.g. "
                                 '["--tensor-parallel-size", "2"] (JSON in the environment).')
    vllm_start_timeout: float = Field(900.0, gt=0, description="Seconds a vLLM server gets to answer its health "
                                      "check before its load fails with the end of its log.")
    vllm_max_lora_rank: int = Field(64, description="Largest adapter rank a vLLM server accepts (vLLM allows 1, 8, "
                                    "16, 32, 64, 128, 256, 320, 512).")
    vllm_max_loras: int = Field(4, ge=1, description="Adapters a vLLM server batches together at once.")
    max_tokens_limit: int = Field(8192, ge=1, description="Largest max_tokens a request may ask for.")
    max_prompt_chars: int = Field(200_000, ge=1, description="Longest prompt, in characters.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body; past it, 413.")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS (off when empty).")
    log_format: str = Field("text", pattern="^(text|json)$", description="json: one JSON object a line.")
    allow_insecure_bind: bool = Field(
        False, description="Listen on a non-loopback address without an API key (otherwise refused)."
    )

    @model_validator(mode="after")
    def _fill_paths(self) -> ServiceSettings:
        self.workspace = self.workspace.expanduser().resolve()
        self.data_dir = (self.workspace / (self.data_dir or "data")).resolve()
        self.models_dir = (self.workspace / (self.models_dir or "models")).resolve()
        self.config_path = self.workspace / (self.config_path or "config/models.yaml")
        if self.lease_renew_seconds >= self.lease_seconds:
            raise ValueError(f"lease_renew_seconds ({self.lease_renew_seconds}) must be shorter than lease_seconds "
                             f"({self.lease_seconds})")
        if not self.database_url:
            self.database_url = f"sqlite:///{self.workspace / 'gpt_service.db'}"
        return self

    @property
    def data_root(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir

    @property
    def models_root(self) -> Path:
        assert self.models_dir is not None
        return self.models_dir


def load_settings(**overrides: Any) -> ServiceSettings:
    """Settings from the environment and `.env`, with explicit (non-None) overrides on top."""
    return ServiceSettings(**{k: v for k, v in overrides.items() if v is not None})
