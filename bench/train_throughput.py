"""Training throughput: a transformers-docs `Trainer` script, TRL's `SFTTrainer`, and ours, on one model and data.

Run it from the repository root (about 8 minutes on 2 CPU cores, no network needed):

    .venv/bin/python bench/train_throughput.py --wait-idle 600

It builds, from fixed seeds, a Qwen2 model (hidden 512, 8 layers, 8 heads, 2 KV heads,
intermediate 1408, vocabulary 32000, random weights) with a 32000-token byte-level BPE tokenizer
in which every word is one token, and 400 chat-like samples whose lengths are log-normal (median
about 100 tokens, at most 512); 10% of them are held out for validation. Then, one after another,
each in a fresh Python process, it trains a LoRA (r=16, alpha=32, dropout 0.05 on q,k,v,o; batch 4;
lr 2e-4, linear decay; one epoch; 90 optimizer steps for every run) with:

  (a)  the script a user writes from the transformers docs: `Trainer` + PEFT, fp32,
       `tokenizer(..., padding="max_length", max_length=512)`, `DataCollatorForLanguageModeling`;
  (b0) TRL's `SFTTrainer` as its quick start has it (gradient checkpointing on, padded
       batches), with bf16 turned on: for reference, the (b) that the spec's targets were set on;
  (b)  TRL's `SFTTrainer` with its best settings for this machine: base weights in bf16, bf16
       autocast, gradient checkpointing off, padding-free batches (each batch one row, no
       padding; `--trl-mode padded|packing`, `--trl-base fp32` and `--trl-pad-to 16` (its
       `pad_to_multiple_of`, which ours does; it gains TRL nothing) measure the alternatives);
  (c)  ours: `gpt_service.training.run_lora_finetune` with the defaults of config/models.yaml
       (no evaluation during training: none of the runs evaluates before the end).

It prints each one's real (non-padding) training tokens per second, the ratios to ours, the
validation loss of each adapter after the epoch (all computed the same way: fp32, mean next-token
cross-entropy over every token of the same 40 held-out samples), our model FLOP utilisation
against a bf16 matrix-multiply peak it measures first, and whether the spec's targets are met
(ours >= 7x (a) and >= 4x (b), validation loss within 2% of (a)'s).

Options: `--only c` (or `a,c`, ...) runs only some; `--samples N` for a quicker, smaller run;
`--keep DIR` keeps the model, data and adapters in DIR; `--threads N` (default: every core);
`--results bench/RESULTS.md` also writes the report there. Run it on an otherwise idle machine:
the last column of the table is the share of the CPUs that other processes took during each run
(anything above a few percent skews that run's figures), and `--wait-idle 600` waits up to 10
minutes for quiet before each measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VOCAB = 32000
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 512, 8, 8, 2, 1408
MAX_LENGTH = 512
BATCH_SIZE, LEARNING_RATE = 4, 2e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EOS, PAD, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIALS = [EOS, PAD, IM_START, IM_END]


# -- the set-up ------------------------------------------------------------------------------


def word_list(vocab: int = VOCAB) -> list[str]:
    """The words of a `vocab`-token vocabulary: every 1-3 letter word, then 4-letter words to fill it."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = list(letters)
    for _ in range(2):
        words += [w + c for w in words if len(w) == len(words[-1]) for c in letters]
    room = vocab - 256 - len(SPECIALS) - len(words)
    words += [w + c for w in words if len(w) == 3 for c in letters][:room]
    return words


def build_tokenizer(out: Path, vocab_size: int = VOCAB) -> None:
    """A byte-level BPE tokenizer with exactly `vocab_size` entries in which every word is one token.

    transformers loads any Qwen2 model's tokenizer as `Qwen2Tokenizer` (byte-level BPE, Qwen's
    pre-tokenizer) from tokenizer.json's vocabulary and merges, so the words are spelled into it:
    " abcd" is the merges " a", " ab", " abc", " abcd", in that order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: (len(ch.encode()), ord(ch)))
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *alphabet])}
    merges = []
    for word in sorted(word_list(vocab_size), key=len):
        token = "\u0120" + word
        vocab[token] = len(vocab)
        merges.append((token[:-1], token[-1]))
    assert len(vocab) == vocab_size, len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END], model_max_length=2048,
    )
    fast.save_pretrained(out)


def build_model(out: Path, seed: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=0, pad_token_id=None,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(out, safe_serialization=True)


def make_samples(n: int, seed: int, *, median: float = 100, sigma: float = 0.6, cap: int = MAX_LENGTH,
                 vocab: int = VOCAB) -> list[str]:
    """Chat-like texts with log-normal token counts (median ~100, cap 512; sigma=0: all `median` long) in
    the words of `build_tokenizer(..., vocab)`, every word one token.

    Words follow a Zipf law, and about a third repeat a word seen earlier in the same sample, so
    a LoRA has something to learn (word frequencies, copying from context) in one epoch.
    """
    rng = random.Random(seed)
    words = word_list(vocab)
    rng.shuffle(words)
    cumulative, total = [], 0.0
    for k in range(len(words)):
        total += 1.0 / (k + 1) ** 1.1
        cumulative.append(total)
    texts = []
    for _ in range(n):
        length = max(16, min(cap, round(rng.lognormvariate(math.log(median), sigma))))
        content = length - 7  # <|im_start|> usr ...<|im_end|><|im_start|> bot ...<|im_end|><|endoftext|>
        seen: list[str] = []
        picked = []
        for _ in range(content):
            if seen and rng.random() < 0.35:
                picked.append(rng.choice(seen))
            else:
                picked.append(rng.choices(words, cum_weights=cumulative)[0])
                seen.append(picked[-1])
        cut = max(1, round(content * rng.uniform(0.2, 0.6)))
        texts.append(f"{IM_START} usr {' '.join(picked[:cut])}{IM_END}{IM_START} bot "
                     f"{' '.join(picked[cut:])}{IM_END}{EOS}")
    return texts


@dataclasses.dataclass
class Setup:
    root: Path
    model_dir: Path
    train_path: Path
    train_texts: list[str]
    train_ids: list[list[int]]
    eval_ids: list[list[int]]


def build_setup(root: Path, n_samples: int, seed: int, *, write: bool = True) -> Setup:
    """The model, tokenizer and data in `root`: written there, or (write=False) read back."""
    from transformers import AutoTokenizer

    model_dir = root / "model"
    if write:
        build_model(model_dir, seed)
        build_tokenizer(model_dir)
    texts = make_samples(n_samples, seed)
    n_eval = n_samples // 10
    order = random.Random(seed + 1).sample(range(n_samples), n_samples)
    eval_texts = [texts[i] for i in sorted(order[:n_eval])]
    train_texts = [texts[i] for i in sorted(order[n_eval:])]
    train_path = root / "train.json"
    if write:
        train_path.write_text(json.dumps([{"text": t} for t in train_texts]), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_ids = [tokenizer(t).input_ids for t in train_texts]
    eval_ids = [tokenizer(t).input_ids for t in eval_texts]
    assert all(ids[-1] == tokenizer.eos_token_id and len(ids) <= MAX_LENGTH for ids in train_ids + eval_ids)
    assert all(tokenizer.decode(ids) == text for ids, text in zip(train_ids, train_texts, strict=True))
    return Setup(root, model_dir, train_path, train_texts, train_ids, eval_ids)


# -- what is measured --------------------------------------------------------------------------


def bf16_matmul_peak(size: int = 2048, seconds: float = 3.0) -> float:
    """Best bf16 GEMM rate seen, in FLOP/s, for size x size matrices."""
    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def training_flops(lengths: list[int]) -> float:
    """Model FLOPs of one LoRA training pass over samples of these lengths (no padding counted).

    Per token: frozen base matmuls (attention and MLP projections, lm_head on every labelled
    token) cost 2P forward + 2P for the input gradient = 4P, with no weight gradient; the LoRA
    matrices cost the usual 6P; attention scores and values cost 4·d·L forward and 8·d·L backward
    per layer for a sample of length L, halved for the causal mask. Embedding lookups are free.
    """
    head = HIDDEN // HEADS
    kv = KV_HEADS * head
    frozen_per_layer = HIDDEN * HIDDEN * 2 + HIDDEN * kv * 2 + 3 * HIDDEN * INTERMEDIATE
    lora_per_layer = 16 * (HIDDEN + HIDDEN) * 2 + 16 * (HIDDEN + kv) * 2  # q,o: 512->512; k,v: 512->128
    flops = 0.0
    for n in lengths:
        labelled = n - 1
        flops += n * LAYERS * (4 * frozen_per_layer + 6 * lora_per_layer)
        flops += labelled * 4 * HIDDEN * VOCAB
        flops += LAYERS * 12 * HIDDEN * n * n / 2
    return flops


@torch.no_grad()
def validation_loss(model_dir: Path, adapter_dir: Path | None, eval_ids: list[list[int]]) -> float:
    """Mean next-token cross-entropy over every token of the eval samples, fp32, one sample at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    total, count = 0.0, 0
    for ids in eval_ids:
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
        count += len(ids) - 1
    return total / count


class OtherLoad:
    """The share of the machine's CPU time that processes other than this one (and `pids`, a server
    it drives) took since construction (Linux; NaN elsewhere): on a shared machine a busy neighbour
    slows the runs down, and multi-threaded ones (the peers compute on every core) far more."""

    def __init__(self, pids: tuple[int, ...] = ()) -> None:
        self.pids = pids
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            jiffies = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            ours = 0
            for pid in self.pids:  # utime + stime of the server, all its threads
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ours += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        times = os.times()
        busy = sum(jiffies) - jiffies[3] - jiffies[4]  # all but idle and iowait
        return sum(jiffies) / tick, busy / tick, times.user + times.system + ours / tick

    def share(self) -> float:
        end = self._sample()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return float("nan")
        total, busy, ours = (e - s for e, s in zip(end, self.start, strict=True))
        return min(max((busy - ours) / total, 0.0), 1.0)


@dataclasses.dataclass
class Result:
    name: str
    seconds: float
    real_tokens: int
    steps: int
    val_loss: float = float("nan")
    other_load: float = float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds


def _lora_config():  # the spec's lora_config block, as a docs user writes it
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.05, bias="none",
                      task_type="CAUSAL_LM")


# -- (a) the transformers-docs script ------------------------------------------------------------


def run_docs_trainer(setup: Setup, out: Path) -> Result:
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
    model = AutoModelForCausalLM.from_pretrained(setup.model_dir)  # fp32, as saved
    model = get_peft_model(model, _lora_config())
    dataset = Dataset.from_list([{"text": t} for t in setup.train_texts])

    def tokenize(batch):
        return tokenizer(batch["text"], padding="max_length", truncation=True, max_length=MAX_LENGTH)

    dataset = dataset.map(tokenize, batched=True, remove_columns=["text"])
    args = TrainingArguments(
        output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE, max_grad_norm=1.0, warmup_steps=0, lr_scheduler_type="linear",
        save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=10**9, seed=42,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    model.save_pretrained(out / "adapter")
    return Result("(a) Trainer, docs script, fp32", seconds, sum(map(len, setup.train_ids)), output.global_step)


# -- (b) TRL SFTTrainer ----------------------------------------------------------------------------


def run_trl(setup: Setup, out: Path, mode: str, base_dtype: str, pad_to: int | None) -> Result:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
    # bf16: the frozen base stored in bf16 (PEFT still keeps the LoRA weights in fp32), as ours does
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[base_dtype]
    model = AutoModelForCausalLM.from_pretrained(setup.model_dir, dtype=dtype)
    dataset = Dataset.from_list([{"text": t} for t in setup.train_texts])
    batching = {
        "padded": {"max_length": MAX_LENGTH, "train_sampling_strategy": "group_by_length"},
        "padding-free": {"padding_free": True, "max_length": None},  # samples are already <= 512
        "packing": {"packing": True, "max_length": MAX_LENGTH},  # best-fit packing; fewer, fuller rows
    }[mode]
    args = SFTConfig(
        output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE, max_grad_norm=1.0, warmup_steps=0, lr_scheduler_type="linear",
        bf16=True, use_cpu=True, gradient_checkpointing=False, save_strategy="no", report_to="none", disable_tqdm=True,
        logging_steps=10**9, seed=42, pad_to_multiple_of=pad_to, **batching,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=_lora_config())
    trainer.remove_callback(PrinterCallback)  # its end-of-training dict would break up the report
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    trainer.model.save_pretrained(out / "adapter")
    padded_to = f", padded to x{pad_to}" if pad_to else ""
    name = f"(b) TRL SFTTrainer, bf16 autocast, {base_dtype} base, {mode}{padded_to}"
    return Result(name, seconds, sum(map(len, setup.train_ids)), output.global_step)


def run_trl_defaults(setup: Setup, out: Path) -> Result:
    """(b0) SFTTrainer as its quick start has it, bf16 on: gradient checkpointing, padded batches."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list([{"text": t} for t in setup.train_texts])
    args = SFTConfig(
        output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE, bf16=True, use_cpu=True, save_strategy="no", report_to="none",
        disable_tqdm=True, logging_steps=10**9, seed=42,
    )
    trainer = SFTTrainer(model=str(setup.model_dir), args=args, train_dataset=dataset, peft_config=_lora_config())
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    trainer.model.save_pretrained(out / "adapter")
    name = "(b0) TRL SFTTrainer, its defaults + bf16 (gradient checkpointing, padded)"
    return Result(name, seconds, sum(map(len, setup.train_ids)), output.global_step)


# -- (c) ours --------------------------------------------------------------------------------------


def run_ours(setup: Setup, out: Path) -> Result:
    from gpt_service.config import build_train_config
    from gpt_service.training import run_lora_finetune

    config = build_train_config({  # no evaluation during training, as for the peers: measured after, alike
        "base_model": str(setup.model_dir), "dataset_path": str(setup.train_path),
        "validation_split": 0, "output_dir": str(out), "num_epochs": 1,
        "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE, "max_length": MAX_LENGTH,
    }, config_path=REPO / "config" / "models.yaml")
    progress = []
    result = run_lora_finetune(config, on_progress=progress.append)
    real_tokens = sum(map(len, setup.train_ids))
    seconds = real_tokens / progress[-1].tokens_per_second  # training time, as the recipe measures it
    return Result("(c) ours, gpt_service", seconds, real_tokens, result.global_step)


# -- the report ------------------------------------------------------------------------------------


def table(results: dict[str, Result]) -> list[str]:
    ours = results.get("c")
    lines = [
        "| run | steps | train s | real tokens/s | ours / this | val loss | others' CPU share |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results.values():
        ratio = f"{ours.tokens_per_second / result.tokens_per_second:.2f}x" if ours else "-"
        lines.append(f"| {result.name} | {result.steps} | {result.seconds:.1f} | {result.tokens_per_second:,.0f} | "
                     f"{ratio} | {result.val_loss:.4f} | {100 * result.other_load:.0f}% |")
    return lines


def verdict(results: dict[str, Result]) -> list[str]:
    """The spec's targets: ours >= 7x (a) and >= 4x (b), validation loss within 2% of (a)'s."""
    ours, lines = results.get("c"), []
    if ours is None:
        return lines
    for key, target in (("a", 7.0), ("b", 4.0)):
        if key in results:
            ratio = ours.tokens_per_second / results[key].tokens_per_second
            met = "met" if ratio >= target else "MISSED"
            lines.append(f"ours / ({key}): {ratio:.2f}x (target >= {target:.0f}x: {met})")
    if "a" in results:
        gap = ours.val_loss / results["a"].val_loss - 1
        lines.append(f"ours vs (a) validation loss: {100 * gap:+.2f}% "
                     f"(target within 2%: {'met' if abs(gap) <= 0.02 else 'MISSED'})")
    return lines


def machine() -> str:
    import peft
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}, trl {trl_version}")


def wait_until_idle(limit: float) -> None:
    """Wait (at most `limit` seconds) until other processes use under 10% of the CPUs for 10 s."""
    if limit <= 0:
        return
    deadline, quiet_since = time.monotonic() + limit, None
    while time.monotonic() < deadline:
        meter = OtherLoad()
        time.sleep(2)
        if meter.share() < 0.10:
            quiet_since = quiet_since or time.monotonic() - 2
            if time.monotonic() - quiet_since >= 10:
                return
        else:
            quiet_since = None
    print(f"  (the machine did not go idle within {limit:.0f} s; measuring anyway)", flush=True)


def load_average() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def quiet_libraries(threads: int) -> None:
    """Use `threads` torch threads; no warnings, library logs below ERROR, or progress bars in the report."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def publish(report: str, title: str, header: list[str], path: Path | None) -> None:
    """Print the report; with `path`, also write it there as Markdown: a title, the command that ran
    this script, the header as a list, then the report."""
    print(report)
    if path is None:
        return
    command = " ".join([f".venv/bin/python bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    path.write_text(
        f"# {title}\n\n`{command}` ({time.strftime('%Y-%m-%d %H:%M %Z')})\n\n"
        + "".join(f"- {line}\n" for line in header) + report + "\n",
        encoding="utf-8",
    )


def run_one(key: str, setup: Setup, args: argparse.Namespace) -> Result:
    """Train with one contender, timing it, then score its adapter on the held-out samples."""
    out = setup.root / f"run-{key}"
    others = OtherLoad()
    if key == "a":
        result = run_docs_trainer(setup, out)
    elif key == "b0":
        result = run_trl_defaults(setup, out)
    elif key == "b":
        result = run_trl(setup, out, args.trl_mode, args.trl_base, args.trl_pad_to)
    else:
        result = run_ours(setup, out)
    result.other_load = others.share()
    adapter = out / ("lora_adapter" if key == "c" else "adapter")
    result.val_loss = validation_loss(setup.model_dir, adapter, setup.eval_ids)
    return result


def run_in_child(key: str, root: Path, args: argparse.Namespace) -> Result:
    """`run_one` in a fresh Python process, so that no run inherits another's threads, caches or heap."""
    argv = [sys.executable, __file__, "--child", key, "--keep", str(root), "--samples", str(args.samples),
            "--seed", str(args.seed), "--trl-mode", args.trl_mode, "--trl-base", args.trl_base,
            *(["--trl-pad-to", str(args.trl_pad_to)] if args.trl_pad_to else []),
            "--threads", str(args.threads)]
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True)
    return Result(**json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="a,b0,b,c", help="which runs, e.g. a,c")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-mode", choices=["padded", "padding-free", "packing"], default="padding-free")
    parser.add_argument("--trl-base", choices=["bf16", "fp32"], default="bf16", help="(b)'s frozen base dtype")
    parser.add_argument("--trl-pad-to", type=int, default=None, help="(b)'s pad_to_multiple_of")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--keep", type=Path, help="keep the model, data and adapters in this folder")
    parser.add_argument("--results", type=Path, help="also write the report, as Markdown, to this file")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each measurement, wait up to this long for other processes to go quiet")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # run_in_child's: one run, its Result as JSON
    args = parser.parse_args()
    runs = [r.strip() for r in args.only.split(",")]
    if unknown := set(runs) - {"a", "b0", "b", "c"}:
        parser.error(f"unknown run(s) {', '.join(sorted(unknown))}; choose from a, b0, b, c")

    quiet_libraries(args.threads)
    import datasets

    datasets.disable_progress_bars()
    if args.child:
        result = run_one(args.child, build_setup(args.keep, args.samples, args.seed, write=False), args)
        print(json.dumps(dataclasses.asdict(result)))
        return

    header = [machine(), f"1-minute load average at the start: {load_average()} (other work on the machine "
                         "skews every figure below)"]
    print("\n".join(header), flush=True)
    wait_until_idle(args.wait_idle)
    peak = bf16_matmul_peak()
    header.append(f"bf16 matmul peak (2048x2048, best of 3 s): {peak / 1e9:,.0f} GFLOP/s")
    print(header[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        setup = build_setup(root, args.samples, args.seed)
        lengths = sorted(map(len, setup.train_ids))
        header.append(
            f"{len(setup.train_ids)} train / {len(setup.eval_ids)} validation samples; {sum(lengths):,} train "
            f"tokens, median {lengths[len(lengths) // 2]}, longest {lengths[-1]}; base model validation loss "
            f"{validation_loss(setup.model_dir, None, setup.eval_ids):.4f}"
        )
        print(header[-1], flush=True)
        results: dict[str, Result] = {}
        for key in runs:
            wait_until_idle(args.wait_idle)
            result = results[key] = run_in_child(key, root, args)
            print(f"{result.name}: {result.tokens_per_second:,.0f} real tokens/s over {result.seconds:.1f} s, "
                  f"{result.steps} steps, val loss {result.val_loss:.4f}, other processes' CPU share "
                  f"{100 * result.other_load:.0f}%", flush=True)
    footer = []
    if "c" in results:
        achieved = training_flops(lengths) / results["c"].seconds
        footer.append(f"ours: {achieved / 1e9:,.1f} GFLOP/s of model FLOPs = {100 * achieved / peak:.1f}% MFU "
                      "of the measured bf16 matmul peak")
    footer += verdict(results)
    footer.append(f"1-minute load average at the end: {load_average()}")
    publish("\n".join(["", *table(results), "", *footer]), "Training throughput", header, args.results)


if __name__ == "__main__":
    main()
