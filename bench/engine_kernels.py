"""The serving engine alone (no HTTP): its CPU kernels with a decode step's layers in one call, the same
kernels called layer by layer from Python, and PyTorch's operators in their place.

What `GPT_SERVICE_CPU_KERNELS` and `cpu_kernels.decode_layers` buy, without the HTTP server and its
clients on the same cores: the model, prompts and greedy 128-token completions of
`serve_throughput.py`, all requests of a level submitted at once, the variants alternated `--rounds`
times (these machines are noisy), in bf16.

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
    variants = ("kernels, layers in one call", "kernels, layer by layer", "PyTorch's operators")
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as root:
        model = build_workspace(Path(root), args.seed) / "models" / "bench-model"
        for _ in range(args.rounds):
            for variant in variants:
                registry = ModelRegistry(EngineOptions(cpu_kernels=variant != variants[2]))
                engine = registry.load("bench", str(model), None, "bfloat16").base.engine
                tokens_per_second(engine, make_prompts(16, args.seed + 1))  # warm-up; the runner is made
                if variant == variants[1]:
                    engine._runner.decoder.in_one_call = None  # type: ignore[union-attr]
                for level, prompts in levels.items():
                    results.setdefault((level, variant), []).append(tokens_per_second(engine, prompts))
                registry.close()
    print(f"| level | {' | '.join(f'{v} (tokens/s)' for v in variants)} | one call / layer by layer "
          "| one call / PyTorch's operators |")
    print("| --- |" + " ---: |" * (len(variants) + 2))
    for level in levels:
        runs = [results[level, variant] for variant in variants]
        medians = [statistics.median(values) for values in runs]
        shown = " | ".join(", ".join(f"{v:,.0f}" for v in values) for values in runs)
        print(f"| {level} | {shown} | {medians[0] / medians[1]:.2f}x | {medians[0] / medians[2]:.2f}x |")


if __name__ == "__main__":
    main()
