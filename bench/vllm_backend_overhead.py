"""What our API costs in front of vLLM: vLLM alone, against gpt-service with the vLLM backend, same model.

Run it from the repository root once `bash scripts/setup-vllm.sh` has made .venv-vllm (about 5 minutes
on 2 CPU cores, no network needed):

    .venv/bin/python bench/vllm_backend_overhead.py --markdown bench/VLLM_RESULTS.md

It builds the serving benchmark's model (bench/serve_throughput.py: Qwen2, hidden 512, 8 layers,
vocabulary 32000, random weights) and starts:

  (d) vLLM alone: its OpenAI server, with the very command line our backend gives it
      (`gpt_service.inference.vllm.backend.vllm_command`: LoRA on, our batch size);
  (e) ours, vLLM backend: `gpt-service serve`, the model loaded with `"backend": "vllm"`, so that
      our server starts its own vLLM server with that command and proxies every request to it;
  (c) ours, builtin engine (with `--builtin`), for reference.

(d) and (e) run side by side and are measured in turn, three times at each level, so that a busy
neighbour weighs on both alike; (c) after them. Each gets a warm-up round, then its clients (1 and
16 by default) send streamed greedy 128-token `/v1/completions` one after another (two rounds each).
It reports the completion tokens/s (from each stream's usage), the time to the first piece of text
(p50, p95) and the request latency, and the proxy's cost: (e) against (d) in tokens/s and in time
to first token (medians of the runs).
The "front process CPU" is the CPU time per generated token of the process the clients talk to:
vLLM's API server in (d), our server alone (the proxy, without its vLLM children) in (e). The model
is served in bf16 (`--dtype`). vLLM's KV cache gets `VLLM_CPU_KVCACHE_SPACE` GB (2 unless set).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from serve_throughput import (  # noqa: E402
    BIN,
    MAX_TOKENS,
    MODEL_NAME,
    Level,
    Server,
    build_workspace,
    free_port,
    make_prompts,
)
from train_throughput import OtherLoad, wait_until_idle  # noqa: E402

from gpt_service.inference.vllm.backend import BASE_NAME, vllm_command  # noqa: E402
from gpt_service.inference.vllm.process import VllmProcess  # noqa: E402
from gpt_service.settings import load_settings  # noqa: E402


@dataclass
class StreamLevel(Level):
    first_piece: list[float] = field(default_factory=list)  # seconds from sending to the first text
    front_cpu: float = float("nan")  # CPU seconds of the process the clients talk to (its threads, no children)

    @property
    def front_ms_per_token(self) -> float:
        return 1000 * self.front_cpu / sum(self.tokens) if self.tokens else float("nan")

    def ttft(self, q: float) -> float:
        return Level(self.server, self.label, self.clients, latencies=self.first_piece).percentile(q)


def stream_once(session: requests.Session, url: str, body: dict) -> tuple[float, float, int]:
    """(time to the first text, whole time, completion tokens) of one streamed completion."""
    began, first, tokens = time.perf_counter(), None, None
    with session.post(f"{url}/v1/completions", json=body, stream=True, timeout=900) as response:
        response.raise_for_status()
        for line in response.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                first = time.perf_counter() - began
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if first is None or tokens is None:
        raise ValueError("the stream had no text or no usage")
    return first, time.perf_counter() - began, tokens


def drive_streams(url: str, model: str, clients: int, total: int, prompts: list[str], level: StreamLevel,
                  pids: tuple[int, ...]) -> StreamLevel:
    """`clients` threads, each on its own connection, stream completions one after another until `total`."""
    counter, lock, gate = iter(range(total)), threading.Lock(), threading.Barrier(clients + 1)

    def client() -> None:
        session = requests.Session()
        gate.wait()
        while (n := next(counter, None)) is not None:
            body = {"model": model, "prompt": prompts[n % len(prompts)], "max_tokens": MAX_TOKENS, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            try:
                first, whole, tokens = stream_once(session, url, body)
            except (requests.RequestException, ValueError) as exc:
                with lock:
                    level.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                continue
            with lock:
                level.first_piece.append(first)
                level.latencies.append(whole)
                level.tokens.append(tokens)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    gate.wait()
    began, meter, front = time.perf_counter(), OtherLoad(pids), cpu_seconds(pids[0])
    for thread in threads:
        thread.join()
    level.seconds, level.others = time.perf_counter() - began, meter.share()
    level.front_cpu = cpu_seconds(pids[0]) - front
    return level


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Target:
    """A server under test: where the clients send their completions, and its processes."""

    name: str
    url: str
    model: str
    pids: tuple[int, ...]


def measure(target: Target, clients: int, rounds: int, prompts: list[str], wait_idle: float) -> StreamLevel:
    wait_until_idle(wait_idle)
    level = drive_streams(target.url, target.model, clients, rounds * clients, prompts,
                          StreamLevel(target.name, "base", clients), target.pids)
    print(f"  {target.name:<34} {clients:>3} clients: {level.tokens_per_second:7,.0f} tok/s, first text p50 "
          f"{level.ttft(50):.3f} s p95 {level.ttft(95):.3f} s, latency p50 {level.percentile(50):.2f} s, "
          f"{len(level.tokens)} requests, {len(level.errors)} errors, front {level.front_ms_per_token:.2f} CPU "
          f"ms/token, others {100 * level.others:.0f}% CPU", flush=True)
    return level


def warmed(target: Target, prompts: list[str]) -> Target:
    drive_streams(target.url, target.model, 16, 16, prompts[7:], StreamLevel("", "warm-up", 16), target.pids)
    return target


def pids_of(process_id: int) -> tuple[int, ...]:
    """A process and all its descendants (vLLM's engine core, ours' vLLM server), for the CPU meter."""
    found, frontier = [process_id], [process_id]
    while frontier:
        children = []
        for task in Path(f"/proc/{frontier.pop()}/task").glob("*"):  # a thread's children are its own
            with contextlib.suppress(OSError):
                children += [int(c) for c in (task / "children").read_text().split()]
        found += children
        frontier += children
    return tuple(found)


@contextmanager
def vllm_alone(workspace: Path, dtype: str, prompts: list[str]) -> Iterator[Target]:
    """vLLM's own server, started and stopped by our supervisor, with the command line our backend gives it."""
    port = free_port()
    command = vllm_command(load_settings(workspace=workspace), str(workspace / "models" / "bench-model"), dtype,
                           port, [])
    name = f"(d) vLLM alone, {dtype}"
    server = VllmProcess(command, {**os.environ, "HF_HUB_OFFLINE": "1"}, port, workspace / "server-vllm.log", name)
    server.start(timeout=900)
    try:
        assert server.pid is not None
        yield warmed(Target(name, server.url, BASE_NAME, pids_of(server.pid)), prompts)
    finally:
        server.stop()


@contextmanager
def ours(workspace: Path, dtype: str, backend: str, prompts: list[str]) -> Iterator[Target]:
    """`gpt-service serve` with the model loaded on `backend` (vllm: our server starts its own vLLM server)."""
    port = free_port()
    argv = [str(BIN / "python"), "-m", "gpt_service.cli", "serve", "--workspace", str(workspace), "--port", str(port)]
    name = f"(e) ours, vLLM backend, {dtype}" if backend == "vllm" else f"(c) ours, builtin engine, {dtype}"
    with Server(name, argv, port, workspace, workspace / f"server-ours-{backend}.log") as server:
        requests.post(f"{server.url}/models/load", json={"model_name": MODEL_NAME, "model_path": "models/bench-model",
                                                         "dtype": dtype, "backend": backend},
                      timeout=900).raise_for_status()
        assert server.process is not None
        yield warmed(Target(name, server.url, MODEL_NAME, pids_of(server.process.pid)), prompts)


def table(levels: list[StreamLevel]) -> str:
    lines = ["| server | clients | completion tokens/s | first text p50 (s) | first text p95 (s) | latency p50 (s) "
             "| requests | front process CPU (ms/token) | other processes' CPU |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for lv in levels:
        failed = f" ({len(lv.errors)} failed)" if lv.errors else ""
        lines.append(f"| {lv.server} | {lv.clients} | {lv.tokens_per_second:,.0f} | {lv.ttft(50):.3f} | "
                     f"{lv.ttft(95):.3f} | {lv.percentile(50):.2f} | {len(lv.tokens)}{failed} | "
                     f"{lv.front_ms_per_token:.2f} | {100 * lv.others:.0f}% |")
    return "\n".join(lines)


def overhead(levels: list[StreamLevel]) -> str:
    """(e) against (d) at each level, from the medians of their interleaved runs."""
    lines = []
    for count in sorted({lv.clients for lv in levels}):
        alone = [lv for lv in levels if lv.server.startswith("(d)") and lv.clients == count]
        proxied = [lv for lv in levels if lv.server.startswith("(e)") and lv.clients == count]
        if not (alone and proxied):
            continue
        rate = [statistics.median(lv.tokens_per_second for lv in runs) for runs in (alone, proxied)]
        first = [statistics.median(lv.ttft(50) for lv in runs) for runs in (alone, proxied)]
        cpu = statistics.median(lv.front_ms_per_token for lv in proxied)
        lines.append(f"at {count} clients (medians of {len(proxied)} interleaved runs), ours with vLLM / vLLM alone: "
                     f"tokens/s {rate[1] / rate[0]:.2f}x ({rate[1]:,.0f} against {rate[0]:,.0f}), time to first "
                     f"text p50 {1000 * (first[1] - first[0]):+.0f} ms ({first[1]:.3f} s against {first[0]:.3f} s); "
                     f"our proxy's own CPU: {cpu:.2f} ms per token")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,16", help="concurrency levels")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of (d) and (e) per level")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--builtin", action="store_true", help="also measure ours with the builtin engine")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each run, wait up to this long for other processes to go quiet")
    parser.add_argument("--keep", type=Path, help="keep the workspace (model, logs) in this folder")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    prompts, clients = make_prompts(256, 0), [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        workspace = build_workspace(root, 0)
        levels: list[StreamLevel] = []
        # Both up at once, measured in turn, so that a neighbour's load falls on both alike.
        with vllm_alone(workspace, args.dtype, prompts) as alone, ours(workspace, args.dtype, "vllm", prompts) as e:
            for count in clients:
                for _ in range(args.repeats):
                    levels += [measure(target, count, args.rounds, prompts, args.wait_idle) for target in (alone, e)]
        if args.builtin:
            with ours(workspace, args.dtype, "builtin", prompts) as builtin:
                levels += [measure(builtin, count, args.rounds, prompts, args.wait_idle) for count in clients]
        text = f"{table(levels)}\n\n{overhead(levels)}"
        print(f"\n{text}\n\ntotal {time.perf_counter() - began:.0f} s")
        if args.markdown:
            command = " ".join([".venv/bin/python", "bench/vllm_backend_overhead.py", *sys.argv[1:]])
            args.markdown.write_text(f"Command: `{command}` ({os.cpu_count()} CPUs, {cpu_model()}, "
                                     f"{time.strftime('%Y-%m-%d %H:%M')})\n\n{text}\n", encoding="utf-8")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
