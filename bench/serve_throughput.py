"""Serving throughput and latency: a naive server, `transformers serve --continuous-batching`, ours, and vLLM.

Run it from the repository root (10 to 20 minutes on 2 CPU cores, no network needed); vLLM lives
in its own virtualenv, made first by `bash scripts/setup-vllm.sh` (`.venv-vllm`; elsewhere name its
interpreter with `--vllm-python` or GPT_SERVICE_VLLM_PYTHON):

    bash scripts/setup-vllm.sh
    .venv/bin/python bench/serve_throughput.py --only b,c,d --wait-idle 120 --markdown bench/SERVE_RESULTS.md

It builds the training benchmark's model (bench/train_throughput.py: Qwen2, hidden 512, 8 layers,
8 heads, 2 KV heads, intermediate 1408, vocabulary 32000, random weights from a seed, with its
word-level tokenizer) in a workspace's models/ folder, and 8 random LoRA adapters of it (r=16 on
q,k,v,o, random A and B so that they differ). Then it starts, one at a time, HTTP servers on
127.0.0.1 and drives their OpenAI `/v1/completions` route with greedy 128-token completions,
streamed as vLLM's own serving benchmark does (not for `transformers serve`, which died on a
streamed completion here: its TTFT and ITL columns stay empty):

  (a) the naive server: `transformers serve` without `--continuous-batching`, which runs one
      `model.generate` per request, in turn, in the weights' dtype (fp32 here);
  (b) `transformers serve --continuous-batching` (paged attention), in bf16, its best dtype on
      this CPU (`--peer-dtypes bfloat16,float32` measures fp32 too);
  (c) ours: `gpt-service serve`, the model loaded with POST /models/load (default dtype: auto,
      bf16 where the CPU has fast bf16);
  (d) vLLM CPU (`vllm.entrypoints.openai.api_server`), bf16, `VLLM_CPU_KVCACHE_SPACE=4`,
      `--enable-lora --max-loras 8 --max-lora-rank 16`, the 8 adapters as its LoRA modules.

Each server is warmed up first (one lone request, then one concurrent round at 16 clients; the
naive server, which has nothing to batch, gets two lone requests) and then measured at 1, 4, 16
and 64 concurrent clients; each client sends its requests one after another (two rounds each; one
round for the naive server, which would otherwise take minutes). It prints the aggregate
completion tokens/s (tokens actually generated, from each response's usage, over the wall time of
the level), time to first token (TTFT) and inter-token latency (ITL, the gaps between streamed
pieces) at p50 and p99. Ours and vLLM are measured again with 16 clients on one LoRA adapter, and
with 16 clients spread over the 8 adapters of one base. The mixed workload (16 clients) sends
prompts of 16 to 1,500 words (log-uniform: many short, a few long; one word is one token here),
half of them after the same 200-word system prompt. Short prompts are 8 to 40 random words; the
random model rarely emits its EOS, and requests that stop early are counted (the "short" column),
never padded.

`--ours-variant NAME:ENV=VALUE[;ENV=VALUE]` measures ours again with other settings (at 64 clients
and on the mixed workload), e.g. `"no chunked prefill:GPT_SERVICE_CHUNKED_PREFILL=false"`, or
another checkout of the code with `PYTHONPATH=DIR`: what each part of the engine buys.

The servers share the machine with the clients (and with whatever else runs): the last column is
the share of the CPUs that other processes took during the level. A busy neighbour hurts the
peers most, as they compute on every core; `--wait-idle SECONDS` waits (up to that long) before
each level until other processes stay under 10% of the CPUs for 10 s.

Options: `--only a,c` runs some servers only; `--clients 1,16` other concurrency levels;
`--rounds N`; `--peer-dtypes bfloat16,float32`; `--no-adapters`; `--no-mixed`; `--keep DIR` keeps
the workspace (model, adapters, server logs) in DIR; `--markdown FILE` writes the table there too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from train_throughput import (  # noqa: E402
    TARGETS,
    OtherLoad,
    build_model,
    build_tokenizer,
    wait_until_idle,
    word_list,
)

BIN = Path(sys.executable).parent
MAX_TOKENS = 128
N_ADAPTERS = 8
MODEL_NAME = "bench"
SYSTEM_WORDS = 200  # the mixed workload's shared system prompt
MIXED = "mixed workload"
VLLM_PYTHON = os.environ.get("GPT_SERVICE_VLLM_PYTHON", ".venv-vllm/bin/python")


# -- the set-up ------------------------------------------------------------------------------


def build_workspace(root: Path, seed: int) -> Path:
    """workspace/models/bench-model plus workspace/models/adapter-0..7; returns the workspace."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    workspace = root / "workspace"
    model_dir = workspace / "models" / "bench-model"
    if not (model_dir / "model.safetensors").is_file():
        build_model(model_dir, seed)
        build_tokenizer(model_dir)
    for i in range(N_ADAPTERS):
        out = workspace / "models" / f"adapter-{i}"
        if (out / "adapter_model.safetensors").is_file():
            continue
        torch.manual_seed(seed + 1000 + i)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False,
                            task_type="CAUSAL_LM")
        model = get_peft_model(base, config)
        with torch.no_grad():  # PEFT's random init gives large deltas; keep them modest but real
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        model.save_pretrained(out)
    return workspace


def make_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = word_list()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) for _ in range(n)]


def make_mixed_prompts(n: int, seed: int) -> list[str]:
    """Prompts of 16 to 1,500 words, log-uniform; every other one after the same system prompt."""
    rng = random.Random(seed + 1)
    words = word_list()
    system = " ".join(rng.choice(words) for _ in range(SYSTEM_WORDS))
    prompts = []
    for i in range(n):
        body = " ".join(rng.choice(words) for _ in range(round(16 * (1500 / 16) ** rng.random())))
        prompts.append(f"{system} {body}" if i % 2 else body)
    return prompts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server process of ours (started here, stopped here), its log in the workspace."""

    def __init__(self, name: str, argv: list[str], port: int, cwd: Path, log: Path,
                 env: dict[str, str] | None = None, start_seconds: float = 120) -> None:
        self.name, self.argv, self.port, self.cwd, self.log = name, argv, port, cwd, log
        self.env, self.start_seconds = env or {}, start_seconds
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               **self.env}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.argv, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=1).ok:
                    return self
            except requests.RequestException:
                time.sleep(0.3)
        raise TimeoutError(f"{self.name} did not start; see {self.log}")

    def __exit__(self, *exc: object) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


# -- the clients -----------------------------------------------------------------------------


@dataclass
class Level:
    server: str
    label: str
    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)  # time to first token, per request
    itl: list[float] = field(default_factory=list)  # gaps between streamed pieces, all requests
    errors: list[str] = field(default_factory=list)
    others: float = float("nan")  # other processes' share of the CPUs meanwhile

    @property
    def tokens_per_second(self) -> float:
        return sum(self.tokens) / self.seconds if self.seconds else 0.0

    @property
    def short(self) -> int:
        return sum(t < MAX_TOKENS for t in self.tokens)

    def percentile(self, q: float, values: list[float] | None = None) -> float:
        values = self.latencies if values is None else values
        if not values:
            return float("nan")
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def stream_completion(session: requests.Session, url: str, body: dict, timeout: float,
                      stream: bool = True) -> tuple[int, list[float]]:
    """Stream one completion: its completion tokens (from the usage, else one per piece) and the times
    (perf_counter) its non-empty pieces arrived (none when not streamed)."""
    if not stream:
        response = session.post(f"{url}/v1/completions", json=body, timeout=timeout)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"], []
    arrivals: list[float] = []
    tokens = None
    with session.post(f"{url}/v1/completions", json=body | {"stream": True, "stream_options": {"include_usage": True}},
                      timeout=timeout, stream=True) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                arrivals.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (len(arrivals) if tokens is None else tokens), arrivals


def drive(url: str, models: list[str], clients: int, requests_total: int, prompts: list[str],
          level: Level, timeout: float = 900, server_pids: tuple[int, ...] = (), stream: bool = True) -> Level:
    """`clients` threads, each on its own connection, send requests one after another until
    `requests_total` are done; client i asks for models[i % len(models)]."""
    counter = iter(range(requests_total))
    lock = threading.Lock()
    start_gate = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        session = requests.Session()
        model = models[index % len(models)]
        start_gate.wait()
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            body = {"model": model, "prompt": prompts[n % len(prompts)], "max_tokens": MAX_TOKENS,
                    "temperature": 0}
            began = time.perf_counter()
            try:
                tokens, arrivals = stream_completion(session, url, body, timeout, stream)
            except (requests.RequestException, KeyError, ValueError) as exc:
                with lock:
                    level.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                continue
            with lock:
                level.latencies.append(time.perf_counter() - began)
                level.tokens.append(tokens)
                if arrivals:
                    level.ttft.append(arrivals[0] - began)
                    level.itl += [b - a for a, b in itertools.pairwise(arrivals)]

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    start_gate.wait()
    began, meter = time.perf_counter(), OtherLoad(server_pids)
    for thread in threads:
        thread.join()
    level.seconds = time.perf_counter() - began
    level.others = meter.share()
    return level


def process_tree(pid: int) -> tuple[int, ...]:
    """`pid` and its descendants (vLLM computes in a child process, its engine core), Linux only."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tuple(tree)


def warm_up(url: str, models: list[str], prompts: list[str], concurrent: int, stream: bool = True) -> None:
    drive(url, models[:1], 1, 1, prompts, Level("", "warm-up", 1), stream=stream)
    if concurrent > 1:
        drive(url, models, concurrent, concurrent, prompts[7:], Level("", "warm-up", concurrent), stream=stream)


def report(level: Level) -> None:
    errors = f", {len(level.errors)} errors (first: {level.errors[0]})" if level.errors else ""
    print(f"  {level.server:<28} {level.label:<22} {level.clients:>3} clients: {level.tokens_per_second:8,.0f} tok/s, "
          f"p50 {level.percentile(50):6.2f} s, TTFT p50/p99 {level.percentile(50, level.ttft):.3f}/"
          f"{level.percentile(99, level.ttft):.3f} s, ITL p50/p99 {1000 * level.percentile(50, level.itl):.0f}/"
          f"{1000 * level.percentile(99, level.itl):.0f} ms, {len(level.tokens)} requests, "
          f"{level.short} short, other processes {100 * level.others:.0f}% CPU{errors}", flush=True)


def measure(server: Server, models: list[str], clients_levels: list[int], rounds: int, prompts: list[str],
            label: str = "base", wait_idle: float = 0, stream: bool = True) -> list[Level]:
    results = []
    assert server.process is not None
    for clients in clients_levels:
        wait_until_idle(wait_idle)
        level = drive(server.url, models, clients, max(rounds * clients, 3 if rounds == 1 else 4), prompts,
                      Level(server.name, label, clients), server_pids=process_tree(server.process.pid), stream=stream)
        report(level)
        results.append(level)
    return results


# -- the three servers -------------------------------------------------------------------------


def run_transformers(workspace: Path, model_dir: Path, *, continuous: bool, dtype: str, clients: list[int],
                     rounds: int, prompts: list[str], wait_idle: float, mixed: list[str] | None = None
                     ) -> list[Level]:
    """Requests are not streamed: `transformers serve` died on the first streamed completion here, so its
    columns have no TTFT or ITL."""
    port = free_port()
    argv = [str(BIN / "transformers"), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
            "--dtype", dtype, "--continuous-batching" if continuous else "--no-continuous-batching",
            str(model_dir)]
    name = (f"(b) transformers serve --continuous-batching, {dtype}" if continuous
            else f"(a) naive: transformers serve, {dtype}")
    log = workspace / f"server-{'cb' if continuous else 'naive'}-{dtype}.log"
    with Server(name, argv, port, workspace, log) as server:
        if continuous:
            warm_up(server.url, [str(model_dir)], prompts, 16, stream=False)
        else:  # nothing to batch: two lone requests
            drive(server.url, [str(model_dir)], 1, 2, prompts, Level("", "warm-up", 1), stream=False)
        results = measure(server, [str(model_dir)], clients, rounds, prompts, wait_idle=wait_idle, stream=False)
        if mixed:
            results += measure(server, [str(model_dir)], [16], rounds, mixed, MIXED, wait_idle, stream=False)
        return results


def measure_adapters_and_mixed(server: Server, names: list[str], rounds: int, mixed: list[str] | None,
                               wait_idle: float) -> list[Level]:
    """16 clients on one adapter, then on all of them (when `names`), then the mixed workload on the base."""
    results = []
    if names:
        warm_up(server.url, names, make_prompts(32, 7), 16)
        results += measure(server, names[:1], [16], rounds, make_prompts(256, 0), "1 LoRA adapter", wait_idle)
        results += measure(server, names, [16], rounds, make_prompts(256, 0), f"{N_ADAPTERS} LoRA adapters",
                           wait_idle)
    if mixed:
        results += measure(server, [MODEL_NAME], [16], rounds, mixed, MIXED, wait_idle)
    return results


def run_ours(workspace: Path, clients: list[int], rounds: int, prompts: list[str], adapters: bool,
             wait_idle: float, mixed: list[str] | None, variant: str = "", env: dict[str, str] | None = None
             ) -> list[Level]:
    port = free_port()
    argv = [str(BIN / "python"), "-m", "gpt_service.cli", "serve", "--workspace", str(workspace), "--port", str(port)]
    with Server("(c) ours", argv, port, workspace, workspace / f"server-ours{variant}.log", env) as server:
        load = requests.post(f"{server.url}/models/load", json={"model_name": MODEL_NAME,
                                                                 "model_path": "models/bench-model"}, timeout=300)
        load.raise_for_status()
        info = load.json()
        server.name = f"(c) ours, gpt-service, {info['dtype']}" + (f", {variant}" if variant else "")
        print(f"  loaded {MODEL_NAME}: dtype {info['dtype']}", flush=True)
        warm_up(server.url, [MODEL_NAME], prompts, 16)
        results = measure(server, [MODEL_NAME], clients, rounds, prompts, wait_idle=wait_idle)
        names = [f"{MODEL_NAME}-lora-{i}" for i in range(N_ADAPTERS)] if adapters else []
        for i, adapter_name in enumerate(names):
            requests.post(f"{server.url}/models/load", json={
                "model_name": adapter_name, "model_path": "models/bench-model",
                "lora_adapter": f"models/adapter-{i}"}, timeout=300).raise_for_status()
        return results + measure_adapters_and_mixed(server, names, rounds, mixed, wait_idle)


def run_vllm(workspace: Path, model_dir: Path, python: str, clients: list[int], rounds: int, prompts: list[str],
             adapters: bool, wait_idle: float, mixed: list[str] | None) -> list[Level]:
    port = free_port()
    names = [f"{MODEL_NAME}-lora-{i}" for i in range(N_ADAPTERS)] if adapters else []
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name",
            MODEL_NAME, "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048"]
    if names:
        argv += ["--enable-lora", "--max-loras", str(N_ADAPTERS), "--max-lora-rank", "16", "--lora-modules",
                 *[f"{name}={workspace / 'models' / f'adapter-{i}'}" for i, name in enumerate(names)]]
    env = {"VLLM_CPU_KVCACHE_SPACE": "4", "HF_HUB_OFFLINE": "1"}
    with Server("(d) vLLM CPU, bfloat16", argv, port, workspace, workspace / "server-vllm.log", env,
                start_seconds=900) as server:
        warm_up(server.url, [MODEL_NAME], prompts, 16)
        results = measure(server, [MODEL_NAME], clients, rounds, prompts, wait_idle=wait_idle)
        return results + measure_adapters_and_mixed(server, names, rounds, mixed, wait_idle)


# -- the table ---------------------------------------------------------------------------------


def table(levels: list[Level]) -> str:
    lines = ["| server | model | clients | completion tokens/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) "
             "| ITL p99 (ms) | latency p50 (s) | requests | short | other processes' CPU |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    def shown(value: float, form: str) -> str:  # not streamed: no TTFT or ITL
        return "–" if math.isnan(value) else format(value, form)

    for lv in levels:
        errors = f" ({len(lv.errors)} failed)" if lv.errors else ""
        lines.append(f"| {lv.server} | {lv.label} | {lv.clients} | {lv.tokens_per_second:,.0f} | "
                     f"{shown(lv.percentile(50, lv.ttft), '.3f')} | {shown(lv.percentile(99, lv.ttft), '.3f')} | "
                     f"{shown(1000 * lv.percentile(50, lv.itl), '.0f')} | "
                     f"{shown(1000 * lv.percentile(99, lv.itl), '.0f')} | "
                     f"{lv.percentile(50):.2f} | {len(lv.tokens)}{errors} | {lv.short} | {100 * lv.others:.0f}% |")
    return "\n".join(lines)


def verdict(levels: list[Level]) -> str:
    def find(prefix: str, clients: int, label: str) -> Level | None:
        return next((lv for lv in levels if lv.server.startswith(prefix) and lv.clients == clients
                     and lv.label == label and lv.server.count(",") <= 2), None)  # not a variant of ours

    def rate(prefix: str, clients: int, label: str = "base") -> float | None:
        level = find(prefix, clients, label)
        return level.tokens_per_second if level else None

    lines = []
    naive16, cb16, ours16 = rate("(a)", 16), rate("(b)", 16), rate("(c)", 16)
    if ours16 and naive16:
        lines.append(f"ours / (a) at 16 clients: {ours16 / naive16:.1f}x (target >= 20x)")
    if ours16 and cb16:
        lines.append(f"ours / (b) at 16 clients: {ours16 / cb16:.2f}x (target >= 1.5x)")
    ours64, cb64 = rate("(c)", 64), rate("(b)", 64)
    if ours64 and cb64:
        lines.append(f"ours / (b) at 64 clients: {ours64 / cb64:.2f}x (target > 1x)")
    one, mix = rate("(c)", 16, "1 LoRA adapter"), rate("(c)", 16, f"{N_ADAPTERS} LoRA adapters")
    if one and mix:
        lines.append(f"{N_ADAPTERS}-adapter mix / one adapter at 16 clients: {mix / one:.2f}x (target >= 0.7x)")
    ours1, naive1 = rate("(c)", 1), rate("(a)", 1)
    if ours1 and naive1:
        lines.append(f"ours / (a), a lone client: {ours1 / naive1:.2f}x (target >= 1x)")
    for clients, label, target in ((1, "base", 1), (16, "base", 1.5), (64, "base", 1.5),
                                   (16, "1 LoRA adapter", 2.5), (16, f"{N_ADAPTERS} LoRA adapters", 2.5),
                                   (16, MIXED, 1)):
        ours, vllm = rate("(c)", clients, label), rate("(d)", clients, label)
        if ours and vllm:
            lines.append(f"ours / (d) vLLM, {label}, {clients} clients: {ours / vllm:.2f}x (target >= {target}x)")
    ours_mixed, vllm_mixed = find("(c)", 16, MIXED), find("(d)", 16, MIXED)
    if ours_mixed and vllm_mixed and ours_mixed.ttft and vllm_mixed.ttft:
        lines.append(f"TTFT p99, mixed workload: ours {ours_mixed.percentile(99, ours_mixed.ttft):.2f} s, "
                     f"vLLM {vllm_mixed.percentile(99, vllm_mixed.ttft):.2f} s (target: ours lower)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="a,b,c,d", help="which servers, e.g. b,c,d")
    parser.add_argument("--clients", default="1,4,16,64", help="concurrency levels")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per level (naive server: 1)")
    parser.add_argument("--peer-dtypes", default="bfloat16", help="dtypes for (b), e.g. bfloat16,float32")
    parser.add_argument("--no-adapters", action="store_true", help="skip ours and vLLM with LoRA adapters")
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed workload")
    parser.add_argument("--vllm-python", default=VLLM_PYTHON,
                        help="vLLM's interpreter (default: GPT_SERVICE_VLLM_PYTHON, else .venv-vllm/bin/python)")
    parser.add_argument("--ours-variant", action="append", default=[], metavar="NAME:ENV=VALUE[;ENV=VALUE]",
                        help="measure ours again with these environment variables (64 clients, mixed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="keep the workspace (model, adapters, logs) in this folder")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each level, wait up to this long for other processes to go quiet")
    args = parser.parse_args()
    runs = [r.strip() for r in args.only.split(",")]
    clients = [int(c) for c in args.clients.split(",")]

    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        workspace = build_workspace(root, args.seed)
        model_dir = workspace / "models" / "bench-model"
        prompts = make_prompts(256, args.seed)
        mixed = None if args.no_mixed else make_mixed_prompts(64, args.seed)
        print(f"model and {N_ADAPTERS} adapters ready in {workspace} ({time.perf_counter() - began:.0f} s); "
              f"greedy {MAX_TOKENS}-token completions, clients {clients}", flush=True)
        levels: list[Level] = []
        for key in runs:
            if key == "a":
                levels += run_transformers(workspace, model_dir, continuous=False, dtype="float32", clients=clients,
                                           rounds=1, prompts=prompts, wait_idle=args.wait_idle)
            elif key == "b":
                for dtype in args.peer_dtypes.split(","):
                    levels += run_transformers(workspace, model_dir, continuous=True, dtype=dtype, clients=clients,
                                               rounds=args.rounds, prompts=prompts, wait_idle=args.wait_idle,
                                               mixed=mixed)
            elif key == "c":
                levels += run_ours(workspace, clients, args.rounds, prompts, not args.no_adapters, args.wait_idle,
                                   mixed)
                for variant in args.ours_variant:
                    name, _, assignments = variant.partition(":")
                    env = dict(a.split("=", 1) for a in assignments.split(";") if a)
                    levels += run_ours(workspace, [c for c in clients if c == 64], args.rounds, prompts,
                                       False, args.wait_idle, mixed, name, env)
            elif key == "d":
                vllm_python = os.path.abspath(args.vllm_python)  # the servers start in the workspace
                levels += run_vllm(workspace, model_dir, vllm_python, clients, args.rounds, prompts,
                                   not args.no_adapters, args.wait_idle, mixed)
            else:
                raise SystemExit(f"unknown server {key!r}")
        text = table(levels) + "\n\n" + verdict(levels)
        print()
        print(text)
        print(f"\ntotal {time.perf_counter() - began:.0f} s")
        if args.markdown:
            command = " ".join([".venv/bin/python", "bench/serve_throughput.py", *sys.argv[1:]])
            args.markdown.write_text(f"Command: `{command}` ({os.cpu_count()} CPUs, "
                                     f"{time.strftime('%Y-%m-%d %H:%M')})\n\n{text}\n", encoding="utf-8")
        print(json.dumps([{"server": lv.server, "model": lv.label, "clients": lv.clients,
                           "tokens_per_second": round(lv.tokens_per_second, 1), "p50": round(lv.percentile(50), 3),
                           "ttft_p50": round(lv.percentile(50, lv.ttft), 4),
                           "ttft_p99": round(lv.percentile(99, lv.ttft), 4),
                           "itl_p50": round(lv.percentile(50, lv.itl), 5),
                           "itl_p99": round(lv.percentile(99, lv.itl), 5),
                           "p95": round(lv.percentile(95), 3), "requests": len(lv.tokens), "short": lv.short,
                           "errors": len(lv.errors), "other_cpu": round(lv.others, 3)} for lv in levels]))


if __name__ == "__main__":
    main()
