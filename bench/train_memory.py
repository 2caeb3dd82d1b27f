"""Training memory: ours (plain, checkpointing, 4-bit + checkpointing) against TRL's `SFTTrainer`.

Run it from the repository root (about 20 minutes on 2 CPU cores, up to 14 GB of memory for
TRL without checkpointing; no network needed; trl from the `bench` extra):

    .venv/bin/python bench/train_memory.py --wait-idle 300 --results bench/TRAIN_MEMORY.md

It builds, from fixed seeds, a Qwen2-0.5B-shaped model (hidden 896, 24 layers, 14 heads, 2 KV
heads, intermediate 4864, vocabulary 151,936, tied embeddings, random bf16 weights: about 1 GB)
with bench/train_throughput.py's tokenizer grown to that vocabulary (byte-level BPE, every word one
token), and chat-like text records of exactly 1,024 tokens: batch x steps of them to train on, and
a few held out. Then, one after another, each in a fresh Python process so that its peak resident
memory is its own (read from the kernel with `wait4`, as `/usr/bin/time -v` does), it trains a
LoRA (r=16, alpha=32, dropout 0.05 on q,k,v,o; batch 4; lr 2e-4; bf16; the same steps) with:

  plain     ours, `run_lora_finetune` with config/models.yaml's defaults, `gradient_checkpointing: false`;
  ckpt      ours with `gradient_checkpointing: true`;
  nf4       ours with a 4-bit NF4 base (`quantization: {bits: 4, type: nf4, double_quant: true}`) + checkpointing;
  trl-ckpt  TRL `SFTTrainer`, bf16 base and autocast, gradient checkpointing on (its default);
  trl       TRL `SFTTrainer`, bf16, gradient checkpointing off.

Per run it reports the real (non-padding) training tokens per second, the peak RSS, the validation
loss of the adapter (bench/train_throughput.py's: fp32 unquantized base + adapter, mean next-token
cross-entropy over every token of the same held-out samples, in a separate process), and, for ours,
`gpt_service.training.memory.estimate_memory(config).peak_bytes` with its error against the
measured peak ("–" where the estimate is not importable, and for TRL, whose memory it does not
model). Then whether the targets of issue 13 are met: ours with checkpointing at <= 0.4x the peak
memory of TRL with checkpointing and >= 1.8x its tokens/s; 4-bit + checkpointing below 2.5 GB; the
estimate within 15% of the measured peak.

Options: `--only ckpt,trl-ckpt` runs only some; `--steps N` (default 2); `--layers 2 --seq-len 128`
for a quick check of the script. Ours run with the allocator our training command preloads
(tcmalloc where installed, unless GPT_SERVICE_MALLOC=system; gpt_service/training/allocator.py),
TRL with glibc's malloc as a plain script gets, unless `--peers-tcmalloc` preloads tcmalloc for it too;
`--keep DIR` keeps the model, data, adapters and each run's figures (DIR/results.json), and
`--keep DIR --reuse` measures only the runs not yet there (the set-up kept); `--results FILE`
also writes the report there (after every run); `--wait-idle SECONDS` waits for the other processes
to go quiet before each run (the table's last column is the share of the CPUs that other processes
took during each run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for train_throughput's helpers

from train_throughput import (
    REPO,
    OtherLoad,
    _lora_config,
    build_tokenizer,
    load_average,
    machine,
    make_samples,
    publish,
    quiet_libraries,
    validation_loss,
    wait_until_idle,
)

VOCAB = 151_936
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 896, 24, 14, 2, 4864
SEQ_LEN, BATCH_SIZE, LEARNING_RATE = 1024, 4, 2e-4
GB = 1 << 30
NF4 = {"bits": 4, "type": "nf4", "double_quant": True}


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    trl: bool
    checkpointing: bool
    quantization: dict[str, Any] | None = None


CONTENDERS = {
    "plain": Contender("ours, plain", trl=False, checkpointing=False),
    "ckpt": Contender("ours, gradient checkpointing", trl=False, checkpointing=True),
    "nf4": Contender("ours, 4-bit nf4 + gradient checkpointing", trl=False, checkpointing=True, quantization=NF4),
    "trl-ckpt": Contender("TRL SFTTrainer, bf16, gradient checkpointing", trl=True, checkpointing=True),
    "trl": Contender("TRL SFTTrainer, bf16, no checkpointing", trl=True, checkpointing=False),
}


@dataclasses.dataclass
class Result:
    key: str
    name: str
    seconds: float
    real_tokens: int
    steps: int
    other_load: float = float("nan")
    peak_rss: int = 0  # bytes
    val_loss: float = float("nan")
    estimate: int | None = None  # bytes
    adapter: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def estimate_error(self) -> float | None:
        return None if self.estimate is None else self.estimate / self.peak_rss - 1


# -- the set-up ------------------------------------------------------------------------------------


def build_model(out: Path, layers: int, seed: int) -> None:
    """The Qwen2-0.5B shape (`layers` of them), random weights from `seed`, created and saved in bf16."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE, max_position_embeddings=32768,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=0, pad_token_id=None,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16).save_pretrained(out, safe_serialization=True)


def build_setup(root: Path, args: argparse.Namespace) -> None:
    """The model, tokenizer, training records (batch x steps) and held-out texts, written to `root`."""
    build_model(root / "model", args.layers, args.seed)
    build_tokenizer(root / "model", VOCAB)
    n_train = BATCH_SIZE * args.steps
    texts = make_samples(n_train + args.eval_samples, args.seed, median=args.seq_len, sigma=0.0,
                         cap=args.seq_len, vocab=VOCAB)
    (root / "train.json").write_text(json.dumps([{"text": t} for t in texts[:n_train]]), encoding="utf-8")
    (root / "eval.json").write_text(json.dumps(texts[n_train:]), encoding="utf-8")


def setup_description(args: argparse.Namespace) -> dict[str, Any]:
    """What a set-up and its measurements depend on: runs measured under another are not reused."""
    return {"layers": args.layers, "seq_len": args.seq_len, "steps": args.steps, "eval_samples": args.eval_samples,
            "seed": args.seed, "threads": args.threads, "peers_tcmalloc": args.peers_tcmalloc}


def setup_is_there(root: Path, args: argparse.Namespace) -> bool:
    """Whether `root` holds the set-up `build_setup` would write for `args` (for --reuse)."""
    try:
        layers = json.loads((root / "model" / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]
        train, held_out = token_ids(root, "train.json"), token_ids(root, "eval.json")
    except (OSError, ValueError, KeyError):
        return False
    return (layers == args.layers and len(train) == BATCH_SIZE * args.steps and len(held_out) == args.eval_samples
            and {len(ids) for ids in train + held_out} == {args.seq_len})


def token_ids(root: Path, name: str) -> list[list[int]]:
    """The tokens of `root/name` (training records or held-out texts), as both trainers see them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    records = json.loads((root / name).read_text(encoding="utf-8"))
    return [tokenizer(r["text"] if isinstance(r, dict) else r).input_ids for r in records]


# -- the runs --------------------------------------------------------------------------------------


def ours_config(root: Path, key: str, args: argparse.Namespace) -> Any:
    from gpt_service.config import build_train_config

    contender = CONTENDERS[key]
    return build_train_config({  # no evaluation during training: scored afterwards, as TRL's
        "base_model": str(root / "model"), "dataset_path": str(root / "train.json"),
        "validation_split": 0, "output_dir": str(root / f"run-{key}"), "overwrite_output_dir": True,
        "num_epochs": 1, "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE, "max_length": args.seq_len,
        "bf16": True, "gradient_checkpointing": contender.checkpointing, "quantization": contender.quantization,
    }, config_path=REPO / "config" / "models.yaml")


def run_ours(root: Path, key: str, args: argparse.Namespace) -> tuple[float, int, Path]:
    from gpt_service.training import run_lora_finetune

    progress = []
    result = run_lora_finetune(ours_config(root, key, args), on_progress=progress.append)
    tokens = sum(map(len, token_ids(root, "train.json")))
    return tokens / progress[-1].tokens_per_second, result.global_step, Path(result.adapter_dir)


def run_trl(root: Path, key: str, args: argparse.Namespace) -> tuple[float, int, Path]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    out = root / f"run-{key}"
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.bfloat16)
    dataset = Dataset.from_list(json.loads((root / "train.json").read_text(encoding="utf-8")))
    config = SFTConfig(
        output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE, max_grad_norm=1.0, warmup_steps=0, lr_scheduler_type="linear",
        bf16=True, use_cpu=True, gradient_checkpointing=CONTENDERS[key].checkpointing, max_length=args.seq_len,
        save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=10**9, seed=42,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=_lora_config())
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    trainer.model.save_pretrained(out / "adapter")
    return seconds, output.global_step, out / "adapter"


def train_child(root: Path, key: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run, in this (fresh) process: its timing and steps, and where its adapter is."""
    others = OtherLoad()
    seconds, steps, adapter = (run_trl if CONTENDERS[key].trl else run_ours)(root, key, args)
    tokens = sum(map(len, token_ids(root, "train.json")))
    return {"key": key, "name": CONTENDERS[key].name, "seconds": seconds, "real_tokens": tokens, "steps": steps,
            "other_load": others.share(), "adapter": str(adapter)}


def allocator_of(ours: bool, args: argparse.Namespace) -> str:
    from gpt_service.training.allocator import wanted_library

    return "tcmalloc" if (ours or args.peers_tcmalloc) and wanted_library() else "glibc"


def child(args: argparse.Namespace, *what: str, preload: bool = False) -> tuple[dict[str, Any], int]:
    """This script with `--child ...` in a fresh process: its last stdout line as JSON, and its peak RSS.

    The peak is the kernel's ru_maxrss for that process (KiB on Linux), read by `wait4` on it, so
    that each run's peak is its own and not the largest of all the children so far.
    """
    from gpt_service.training.allocator import preloaded_environment

    env = preloaded_environment() if preload else dict(os.environ)
    argv = [sys.executable, __file__, "--child", *what, "--keep", str(args.keep), "--steps", str(args.steps),
            "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(what)} exited with {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss * 1024


def estimate(root: Path, key: str, args: argparse.Namespace) -> int | None:
    """The lead's estimate of ours' peak process memory for this run's config; None where there is none."""
    if CONTENDERS[key].trl:
        return None
    try:
        from gpt_service.training.memory import estimate_memory
    except ImportError:
        return None
    return int(estimate_memory(ours_config(root, key, args)).peak_bytes)


# -- the report ------------------------------------------------------------------------------------


def table(results: dict[str, Result]) -> list[str]:
    lines = ["| run | steps | real tokens/s | peak RSS | estimate | estimate error | val loss | others' CPU share |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(results.values(), key=lambda r: list(CONTENDERS).index(r.key)):
        est = "–" if r.estimate is None else f"{r.estimate / GB:.2f} GB"
        err = "–" if r.estimate_error is None else f"{100 * r.estimate_error:+.1f}%"
        lines.append(f"| {r.name} | {r.steps} | {r.tokens_per_second:,.0f} | {r.peak_rss / GB:.2f} GB | {est} | "
                     f"{err} | {r.val_loss:.4f} | {100 * r.other_load:.0f}% |")
    return lines


def verdict(results: dict[str, Result]) -> list[str]:
    """Issue 13's targets, each met or not (those whose runs are in the table)."""

    def said(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    lines = []
    ours, trl = results.get("ckpt"), results.get("trl-ckpt")
    if ours and trl:
        memory = ours.peak_rss / trl.peak_rss
        speed = ours.tokens_per_second / trl.tokens_per_second
        lines.append(f"ours with checkpointing / TRL with checkpointing, peak memory: {memory:.2f}x "
                     f"(target <= 0.4x: {said(memory <= 0.4)})")
        lines.append(f"ours with checkpointing / TRL with checkpointing, tokens/s: {speed:.2f}x "
                     f"(target >= 1.8x: {said(speed >= 1.8)})")
    if nf4 := results.get("nf4"):
        lines.append(f"4-bit + checkpointing peak: {nf4.peak_rss / GB:.2f} GB "
                     f"(target < 2.5 GB: {said(nf4.peak_rss < 2.5 * GB)})")
    estimated = [r for r in results.values() if r.estimate_error is not None]
    if estimated:
        worst = max(estimated, key=lambda r: abs(r.estimate_error or 0))
        lines.append(f"estimate vs measured peak, worst: {100 * (worst.estimate_error or 0):+.1f}% ({worst.name}) "
                     f"(target within 15% for every run: {said(abs(worst.estimate_error or 0) <= 0.15)})")
    elif any(not CONTENDERS[k].trl for k in results):
        lines.append("estimate: gpt_service.training.memory.estimate_memory is not importable here (target not met)")
    return lines


def report(results: dict[str, Result], header: list[str], path: Path | None, quiet: bool = False) -> None:
    """The table and the targets: printed (unless `quiet`) and, with `path`, written there."""
    footer = [*verdict(results), f"1-minute load average at the end: {load_average()}"]
    text = "\n".join(["", *table(results), "", *footer])
    if quiet:
        with contextlib.redirect_stdout(io.StringIO()):
            publish(text, "Training memory", header, path)
    else:
        publish(text, "Training memory", header, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(CONTENDERS), help=f"which runs, of {', '.join(CONTENDERS)}")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps of every run (batch 4 each)")
    parser.add_argument("--layers", type=int, default=LAYERS, help="decoder layers (24: the Qwen2-0.5B shape)")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help="tokens per sample")
    parser.add_argument("--eval-samples", type=int, default=4, help="held-out samples for the validation loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--peers-tcmalloc", action="store_true", help="TRL's runs preload tcmalloc as ours do")
    parser.add_argument("--keep", type=Path, help="keep the model, data, adapters and results in this folder")
    parser.add_argument("--reuse", action="store_true",
                        help="with --keep: reuse the set-up there and the runs measured there (its results.json)")
    parser.add_argument("--results", type=Path, help="also write the report, as Markdown, to this file")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each run, wait up to this long for other processes to go quiet")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # `train KEY` or `eval ADAPTER|-`
    args = parser.parse_args()
    runs = [r.strip() for r in args.only.split(",")]
    if unknown := set(runs) - set(CONTENDERS):
        parser.error(f"unknown run(s) {', '.join(sorted(unknown))}; choose from {', '.join(CONTENDERS)}")

    quiet_libraries(args.threads)
    if args.child:
        kind, what = args.child
        if kind == "train":
            import datasets

            datasets.disable_progress_bars()
            print(json.dumps(train_child(args.keep, what, args)))
        else:
            adapter = None if what == "-" else Path(what)
            print(json.dumps(validation_loss(args.keep / "model", adapter, token_ids(args.keep, "eval.json"))))
        return

    header = [machine(), f"1-minute load average at the start: {load_average()} (other work on the machine "
                         "skews the tokens/s below)"]
    print("\n".join(header), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        args.keep = args.keep or Path(tmp)
        args.keep.mkdir(parents=True, exist_ok=True)
        record = args.keep / "results.json"  # the set-up's description and every run measured on it
        done = json.loads(record.read_text(encoding="utf-8")) if args.reuse and record.exists() else {}
        if done.get("setup") != setup_description(args):
            done = {"setup": setup_description(args), "runs": {}}
        if not (args.reuse and setup_is_there(args.keep, args)):
            build_setup(args.keep, args)
            done = {"setup": setup_description(args), "runs": {}}
        header.append(
            f"model: hidden {HIDDEN}, {args.layers} layers, vocabulary {VOCAB:,}, tied, bf16; "
            f"{BATCH_SIZE * args.steps} train samples of {args.seq_len} tokens, batch {BATCH_SIZE}, "
            f"{args.steps} steps; {args.eval_samples} held-out samples"
            + f"; ours' allocator: {allocator_of(True, args)}, TRL's: {allocator_of(False, args)}")
        print(header[-1], flush=True)
        results: dict[str, Result] = {}

        def save() -> None:  # each figure as soon as it is measured, in case the rest does not finish
            done["runs"] = {key: dataclasses.asdict(result) for key, result in results.items()}
            record.write_text(json.dumps(done, indent=1), encoding="utf-8")
            if args.results:
                report(results, header, args.results, quiet=True)

        for key in runs:
            if key in done["runs"]:  # measured before; the estimate (cheap, and what is tuned) is made again
                results[key] = Result(**{**done["runs"][key], "estimate": estimate(args.keep, key, args)})
                print(f"{results[key].name}: measured before, in {args.keep}", flush=True)
                continue
            guess = estimate(args.keep, key, args)
            wait_until_idle(args.wait_idle)
            trained, peak = child(args, "train", key, preload=not CONTENDERS[key].trl or args.peers_tcmalloc)
            result = results[key] = Result(**trained, peak_rss=peak, estimate=guess)
            save()
            est = "–" if guess is None else f"{guess / GB:.2f} GB"
            print(f"{result.name}: {result.tokens_per_second:,.1f} real tokens/s over {result.seconds:.1f} s, "
                  f"{result.steps} steps, peak RSS {peak / GB:.2f} GB (estimate {est}), other processes' CPU share "
                  f"{100 * result.other_load:.0f}%", flush=True)
        for result in results.values():  # the validation losses last: memory and speed come first
            if math.isnan(result.val_loss):
                result.val_loss, _ = child(args, "eval", result.adapter)
                save()
                print(f"{result.name}: validation loss {result.val_loss:.4f}", flush=True)
        if "base_loss" not in done:
            done["base_loss"], _ = child(args, "eval", "-")
            save()
        header.append(f"validation loss of the base model (no adapter): {done['base_loss']:.4f}")
    report(results, header, args.results)


if __name__ == "__main__":
    main()
