"""Tokenizing a training set: tokens per second, peak memory and bytes held per token, cold and cached.

Run it from the repository root (about 2 minutes on 2 CPU cores for 100,000 records, no network):

    .venv/bin/python bench/tokenize_throughput.py --records 100000 --baseline 498d731

It writes N chat records (a system prompt and two user/assistant turns, about 500 tokens each with
either tokenizer) as JSONL and, each in a fresh process, runs `prepare_data` as training does:

  cold    an empty cache: read, check, render the chats, tokenize, store the cache entry;
  cached  the same again: the entry is read (memory-mapped), nothing is tokenized;
  before  (with `--baseline REV`) the same cold run on the package at git revision REV, for the
          figures of the one-call-per-segment tokenization into Python lists.

with two tokenizers: `demo` (gpt_service.demo_model: byte-level BPE, 512 ids, ChatML template:
uint16 ids) and `qwen2-size` (151,936 ids like Qwen2's, ChatML, every word one token: uint32 ids).
Reported: tokens/s (tokens over the wall time of `prepare_data`); its CPU time (every thread) and
tokens per 2 CPU-seconds, what two otherwise idle cores would give where the work keeps both busy
(on a shared machine the wall time grows with the neighbours' load, the CPU time far less); peak RSS of the process, RSS
growth held after the call per token (the memory that the prepared samples keep), and for ours the
exact bytes of the arrays per token. `--only demo` runs one tokenizer; `--results FILE` writes the
report there too.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZERS = ("demo", "qwen2-size")
QWEN2_VOCAB = 151_936
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PHRASES = ["the model", "learns to answer", "训练数据", "学习率", "validation loss", "批次大小", "a LoRA adapter",
           "在验证集上", "tokens per second", "Python", "1加1等于2。", "what is", "checkpoint", "你好！"]


def words(n: int) -> list[str]:
    """`n` distinct lowercase words, shortest first (a, b, ..., aa, ab, ...)."""
    found: list[str] = []
    for size in itertools.count(1):
        for letters in itertools.product("abcdefghijklmnopqrstuvwxyz", repeat=size):
            if len(found) == n:
                return found
            found.append("".join(letters))
    raise AssertionError("unreachable")


def qwen2_size_tokenizer() -> object:
    """A byte-level BPE tokenizer with Qwen2's 151,936 ids and ChatML, in which every listed word is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*SPECIALS, *alphabet])}
    merges = []
    for word in words(QWEN2_VOCAB - len(vocab)):
        token = "\u0120" + word  # a word after a space
        vocab[token] = len(vocab)
        merges.append((token[:-1], token[-1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], pad_token=SPECIALS[0],
                                   additional_special_tokens=SPECIALS[1:], chat_template=CHATML)


def chat_records(n: int, seed: int, vocabulary: list[str], scale: int) -> list[dict]:
    """Chats of a system prompt and two turns, of about 60 x `scale` words from `vocabulary`."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(vocabulary) for _ in range(rng.randint(low * scale, high * scale)))

    return [{"messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": text(3, 12)},
        {"role": "assistant", "content": text(12, 45)},
        {"role": "user", "content": text(2, 9)},
        {"role": "assistant", "content": text(9, 35)},
    ]} for _ in range(n)]


def set_up(root: Path, name: str, n: int, seed: int) -> None:
    """The tokenizer folder and the dataset of one tokenizer's runs."""
    from gpt_service.demo_model import build_tokenizer

    tokenizer = build_tokenizer() if name == "demo" else qwen2_size_tokenizer()
    tokenizer.save_pretrained(root / name)
    vocabulary, scale = (PHRASES, 1) if name == "demo" else ([*words(20_000)[-2_000:], *PHRASES], 6)
    with open(root / f"{name}.jsonl", "w", encoding="utf-8") as out:
        for record in chat_records(n, seed, vocabulary, scale):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    """User and system time of this process, all its threads (the tokenizer's too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(root: Path, name: str, phase: str) -> dict:
    """One `prepare_data` call, measured; run in a fresh process."""
    from transformers import AutoTokenizer

    from gpt_service.config import build_train_config
    from gpt_service.data.prepare import prepare_data

    tokenizer = AutoTokenizer.from_pretrained(root / name)
    config = build_train_config({"base_model": str(root / name), "dataset_path": str(root / f"{name}.jsonl"),
                                 "max_length": 4096}, config_path=None)
    gc.collect()
    before = rss_bytes()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    data = prepare_data(config, tokenizer)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    gc.collect()
    held = rss_bytes() - before
    sets = [data.train, data.eval]
    tokens = sum(sum(len(e) for e in s) for s in sets) if phase == "before" else sum(s.tokens for s in sets)
    arrays = None if phase == "before" else data.train.ids.nbytes + data.train.trained.nbytes  # eval's too
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokenizer": name, "phase": phase, "samples": len(data.train) + len(data.eval), "tokens": tokens,
            "seconds": seconds, "cpu_seconds": cpu, "peak_rss": peak, "held": held, "array_bytes": arrays}


def run_child(root: Path, name: str, phase: str, package: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(package), "GPT_SERVICE_DATA_CACHE": str(root / "cache"),
           "TOKENIZERS_PARALLELISM": "true"}
    argv = [sys.executable, __file__, "--child", name, phase, "--root", str(root)]
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    import tokenizers
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    return (f"{cpu}, {os.cpu_count()} cores; transformers {transformers.__version__}, "
            f"tokenizers {tokenizers.__version__}; 1-minute load average at the start {os.getloadavg()[0]:.2f}")


def row(result: dict) -> str:
    tokens = result["tokens"]
    arrays = f"{result['array_bytes'] / tokens:.2f}" if result["array_bytes"] is not None else "-"
    return (f"| {result['tokenizer']} | {result['phase']} | {result['samples']:,} | {tokens / 1e6:.1f} M "
            f"| {result['seconds']:.2f} | {tokens / result['seconds'] / 1e6:.2f} M | {result['cpu_seconds']:.2f} "
            f"| {2 * tokens / result['cpu_seconds'] / 1e6:.2f} M | {result['peak_rss'] / 1e9:.2f} GB "
            f"| {result['held'] / tokens:.1f} | {arrays} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=",".join(TOKENIZERS))
    parser.add_argument("--baseline", help="also run the package at this git revision (cold only)")
    parser.add_argument("--results", type=Path, help="write the report here too")
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.root, *args.child)))
        return
    sys.path.insert(0, str(REPO))
    lines = [f"`{' '.join(['python', *sys.argv])}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"- {machine()}", f"- {args.records:,} chat records (system + two user/assistant turns), max_length 4096",
             "", "| tokenizer | run | samples | tokens | seconds | tokens/s | CPU seconds | tokens per 2 CPU-seconds "
             "| peak RSS | held bytes/token | array bytes/token |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        if args.baseline:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline, "gpt_service"],
                                     stdout=subprocess.PIPE, check=True).stdout
            (root / "baseline").mkdir()
            subprocess.run(["tar", "-x", "-C", str(root / "baseline")], input=archive, check=True)
        for name in args.only.split(","):
            set_up(root, name, args.records, args.seed)
            phases = [("before", root / "baseline")] if args.baseline else []
            for phase, package in [*phases, ("cold", REPO), ("cached", REPO)]:
                result = run_child(root, name, phase, package)
                lines.append(row(result))
                print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.results:
        args.results.write_text(report)


if __name__ == "__main__":
    main()
