"""The serving engine alone (no HTTP), with its CPU kernels and with PyTorch's operators in their place.

What `GPT_SERVICE_CPU_KERNELS` buys, without the HTTP server and its clients on the same cores: the
model, prompts and greedy 128-token completions of `serve_throughput.py`, all requests of a level
submitted at once, both variants alternated `--rounds` times (these machines are noisy), in bf16.

    .venv/bin/python bench/engine_kernels.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from serve_throughput import MAX_TOKENS, build_workspace, make_mixed_prompts, make_prompts  # noqa: E402

from gpt_service.inference.engine import BatchEngine, EngineOptions, GenerationRequest  # noqa: E402
from gpt_service.inference.registry import ModelRegistry  # noqa: E402
from gpt_service.inference.sampling import SamplingParams  # noqa: E402
from gpt_service.inference.sequence import Event  # noqa: E402


def tokens_per_second(engine: BatchEngine, prompts: list[str]) -> float:
    """Completion tokens per second of these prompts, submitted at once."""
    done, lock, counted = threading.Semaphore(0), threading.Lock(), [0]

    def deliver(event: Event) -> None:
        if event.finish_reason:
            with lock:
                counted[0] += event.completion_tokens
            done.release()

    started = time.perf_counter()
    for prompt in prompts:
        engine.submit(GenerationRequest(engine.tokenizer(prompt).input_ids,
                                        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), None, deliver))
    for _ in prompts:
        done.acquire()
    return counted[0] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    levels = {"16 requests": make_prompts(16, args.seed), "64 requests": make_prompts(64, args.seed),
              "mixed workload, 16": make_mixed_prompts(16, args.seed)}
    results: dict[tuple[str, bool], list[float]] = {}
    with tempfile.TemporaryDirectory() as root:
        model = build_workspace(Path(root), args.seed) / "models" / "bench-model"
        for _ in range(args.rounds):
            for kernels in (True, False):
                registry = ModelRegistry(EngineOptions(cpu_kernels=kernels))
                engine = registry.load("bench", str(model), None, "bfloat16").base.engine
                tokens_per_second(engine, make_prompts(16, args.seed + 1))  # warm-up
                for level, prompts in levels.items():
                    results.setdefault((level, kernels), []).append(tokens_per_second(engine, prompts))
                registry.close()
    print("| level | CPU kernels (tokens/s) | PyTorch's operators (tokens/s) | ratio of medians |")
    print("| --- | ---: | ---: | ---: |")
    for level in levels:
        on, off = results[level, True], results[level, False]
        shown = [", ".join(f"{v:,.0f}" for v in values) for values in (on, off)]
        print(f"| {level} | {shown[0]} | {shown[1]} | {statistics.median(on) / statistics.median(off):.2f}x |")


if __name__ == "__main__":
    main()
