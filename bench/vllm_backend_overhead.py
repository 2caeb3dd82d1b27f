"""What our API costs in front of vLLM: vLLM alone, against gpt-service with the vLLM backend, same model.

Run it from the repository root once `bash scripts/setup-vllm.sh` has made .venv-vllm (about 5 minutes
on 2 CPU cores, no network needed):

    .venv/bin/python bench/vllm_backend_overhead.py --markdown bench/VLLM_RESULTS.md

It builds the serving benchmark's model (bench/serve_throughput.py: Qwen2, hidden 512, 8 layers,
vocabulary 32000, random weights) and starts, one at a time:

  (d) vLLM alone: its OpenAI server, with the very command line our backend gives it
      (`gpt_service.inference.vllm.backend.vllm_command`: LoRA on, our batch size);
  (e) ours, vLLM backend: `gpt-service serve`, the model loaded with `"backend": "vllm"`, so that
      our server starts its own vLLM server with that command and proxies every request to it;
  (c) ours, builtin engine (with `--builtin`), for reference.

Each gets a warm-up round, then its clients (1 and 16 by default) send streamed greedy 128-token
`/v1/completions` one after another (two rounds each). It reports the completion tokens/s (from
each stream's usage), the time to the first piece of text (p50, p95) and the request latency, and
the proxy's cost: (e) against (d) in tokens/s and in time to first token. The model is served in
bf16 (`--dtype`). vLLM's KV cache gets `VLLM_CPU_KVCACHE_SPACE` GB (2 unless set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
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
    began, meter = time.perf_counter(), OtherLoad(pids)
    for thread in threads:
        thread.join()
    level.seconds, level.others = time.perf_counter() - began, meter.share()
    return level


def measure(name: str, url: str, model: str, pids: tuple[int, ...], clients: list[int], rounds: int,
            prompts: list[str], wait_idle: float) -> list[StreamLevel]:
    drive_streams(url, model, 16, 16, prompts[7:], StreamLevel("", "warm-up", 16), pids)
    levels = []
    for count in clients:
        wait_until_idle(wait_idle)
        level = drive_streams(url, model, count, rounds * count, prompts, StreamLevel(name, "base", count), pids)
        print(f"  {name:<34} {count:>3} clients: {level.tokens_per_second:7,.0f} tok/s, first text p50 "
              f"{level.ttft(50):.3f} s p95 {level.ttft(95):.3f} s, latency p50 {level.percentile(50):.2f} s, "
              f"{len(level.tokens)} requests, {len(level.errors)} errors, others {100 * level.others:.0f}% CPU",
              flush=True)
        levels.append(level)
    return levels


def pids_of(process_id: int) -> tuple[int, ...]:
    """A process and all its descendants (vLLM's engine core, ours' vLLM server), for the CPU meter."""
    found, frontier = [process_id], [process_id]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        found += [int(c) for c in children]
        frontier += [int(c) for c in children]
    return tuple(found)


def run_vllm_alone(workspace: Path, dtype: str, **run: object) -> list[StreamLevel]:
    """vLLM's own server, started and stopped by our supervisor, as our backend starts it."""
    port = free_port()
    command = vllm_command(load_settings(workspace=workspace), str(workspace / "models" / "bench-model"), dtype,
                           port, [])
    name = f"(d) vLLM alone, {dtype}"
    server = VllmProcess(command, {**os.environ, "HF_HUB_OFFLINE": "1"}, port, workspace / "server-vllm.log", name)
    server.start(timeout=900)
    try:
        assert server.pid is not None
        return measure(name, server.url, BASE_NAME, pids_of(server.pid), **run)  # type: ignore[arg-type]
    finally:
        server.stop()


def run_ours(workspace: Path, dtype: str, backend: str, **run: object) -> list[StreamLevel]:
    port = free_port()
    argv = [str(BIN / "python"), "-m", "gpt_service.cli", "serve", "--workspace", str(workspace), "--port", str(port)]
    name = f"(e) ours, vLLM backend, {dtype}" if backend == "vllm" else f"(c) ours, builtin engine, {dtype}"
    with Server(name, argv, port, workspace, workspace / f"server-ours-{backend}.log") as server:
        requests.post(f"{server.url}/models/load", json={"model_name": MODEL_NAME, "model_path": "models/bench-model",
                                                         "dtype": dtype, "backend": backend},
                      timeout=900).raise_for_status()
        assert server.process is not None
        return measure(name, server.url, MODEL_NAME, pids_of(server.process.pid), **run)  # type: ignore[arg-type]


def table(levels: list[StreamLevel]) -> str:
    lines = ["| server | clients | completion tokens/s | first text p50 (s) | first text p95 (s) | latency p50 (s) "
             "| requests | other processes' CPU |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for lv in levels:
        failed = f" ({len(lv.errors)} failed)" if lv.errors else ""
        lines.append(f"| {lv.server} | {lv.clients} | {lv.tokens_per_second:,.0f} | {lv.ttft(50):.3f} | "
                     f"{lv.ttft(95):.3f} | {lv.percentile(50):.2f} | {len(lv.tokens)}{failed} | "
                     f"{100 * lv.others:.0f}% |")
    return "\n".join(lines)


def overhead(levels: list[StreamLevel]) -> str:
    lines = []
    for count in sorted({lv.clients for lv in levels}):
        alone = next((lv for lv in levels if lv.server.startswith("(d)") and lv.clients == count), None)
        ours = next((lv for lv in levels if lv.server.startswith("(e)") and lv.clients == count), None)
        if alone and ours and alone.tokens_per_second:
            lines.append(f"at {count} clients, ours with vLLM / vLLM alone: tokens/s "
                         f"{ours.tokens_per_second / alone.tokens_per_second:.2f}x "
                         f"({ours.tokens_per_second - alone.tokens_per_second:+,.0f} tok/s), time to first text "
                         f"p50 {1000 * (ours.ttft(50) - alone.ttft(50)):+.0f} ms "
                         f"({ours.ttft(50):.3f} s against {alone.ttft(50):.3f} s)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,16", help="concurrency levels")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--builtin", action="store_true", help="also measure ours with the builtin engine")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each level, wait up to this long for other processes to go quiet")
    parser.add_argument("--keep", type=Path, help="keep the workspace (model, logs) in this folder")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    run = {"clients": [int(c) for c in args.clients.split(",")], "rounds": args.rounds,
           "prompts": make_prompts(256, 0), "wait_idle": args.wait_idle}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        workspace = build_workspace(root, 0)
        levels = run_vllm_alone(workspace, args.dtype, **run)
        levels += run_ours(workspace, args.dtype, "vllm", **run)
        if args.builtin:
            levels += run_ours(workspace, args.dtype, "builtin", **run)
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
