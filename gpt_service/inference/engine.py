"""Continuous batching over one base model and any number of its LoRA adapters.

One thread per base model runs the loop. At every token step, waiting requests join the running
batch (their prompts are prefilled together, then their KV caches are merged into the batch's)
and finished ones leave it. Rows of different adapters share the batch: the prefill goes through
PEFT's mixed-adapter forward (`adapter_names`); the decode steps of Llama-style models (Qwen2,
Llama) go through `_FastDecoder`, the same maths without the generic forward's per-step costs,
each row with its own adapter in a few batched products per projection (other models decode
through PEFT's forward too). The batch's KV cache is left-padded: each row keeps its own keys and
values, and the attention mask hides the padding. `ThreadTuner` picks the step's thread count.
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from gpt_service.inference.errors import ModelNotLoaded, QueueFull
from gpt_service.inference.sampling import SamplingParams, sample_row
from gpt_service.inference.text import TextAssembler

log = logging.getLogger(__name__)
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class ThreadTuner:
    """Chooses the engine's intra-op thread count from the decode steps it times, again and again.

    More threads shorten a step's matrix products when the cores are free, but each product waits
    for its slowest thread: on a small machine where the HTTP event loop, the clients or another
    process keep a core busy, a two-thread step can take ten times as long as a one-thread one.
    So now and then a short trial runs pairs of steps of one batch, one step on a single thread and
    the next on all of them, and keeps all of them if they were faster in most of `pairs` pairs (a
    much slower step ends the trial at once). The next trial comes after `period` decode steps,
    twice as many (up to 16 times) each time a trial confirms the choice. OMP_NUM_THREADS, when
    set, fixes the count instead.
    """

    def __init__(self, most: int | None = None, period: int = 256, pairs: int = 5) -> None:
        self.most = most or torch.get_num_threads()
        self.tuning = self.most > 1 and not os.environ.get("OMP_NUM_THREADS")
        self.current = 1 if self.tuning else self.most
        self.base_period, self.period, self.pairs = period, period, pairs
        self._countdown = 0  # decode steps until the next trial
        self._wins: list[bool] = []  # per pair: were all threads faster?
        self._first: tuple[int, float] | None = None  # the pair's one-thread step: (rows, seconds)
        self._trial_steps = 0
        self._threads = self.current
        self._rows = 0
        self._in_trial = False

    def before_decode(self, rows: int) -> None:
        """Set the thread count for the coming decode step of `rows` rows."""
        self._rows = rows
        self._in_trial = self.tuning and self._countdown <= 0
        if not self._in_trial:
            self._countdown -= 1
            threads = self.current
        else:  # a pair's second step runs on all threads, if the batch is still the same
            threads = self.most if self._first is not None and self._first[0] == rows else 1
        self._threads = threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def after_decode(self, seconds: float) -> None:
        if not self._in_trial:
            return
        self._trial_steps += 1
        much_slower = False
        if self._threads == 1:
            self._first = (self._rows, seconds)
        else:
            assert self._first is not None
            self._wins.append(seconds < self._first[1])
            much_slower = seconds > 1.5 * self._first[1]
            self._first = None
        if much_slower or len(self._wins) >= self.pairs or self._trial_steps >= 8 * self.pairs:
            if much_slower or len(self._wins) >= self.pairs:
                choice = self.most if not much_slower and sum(self._wins) * 2 > len(self._wins) else 1
                self.period = min(2 * self.period, 16 * self.base_period) if choice == self.current \
                    else self.base_period
                self.current = choice
                log.debug("decode steps on %d thread(s): %d of %d pairs were faster on %d", self.current,
                          sum(self._wins), len(self._wins), self.most)
            self._countdown, self._wins, self._first, self._trial_steps = self.period, [], None, 0
            if torch.get_num_threads() != self.current:
                torch.set_num_threads(self.current)


@functools.cache
def _cache_keyword_of(forward: Callable[..., Any]) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _cache_keyword(model: Any) -> str:
    """The KV-cache argument's name: `cache` where the forward takes it (transformers 5.24), else `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_keyword_of(type(base).forward)


def _free_memory() -> int:
    """Bytes of memory available to this process (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _contiguous_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(), *args[1:]) if args and isinstance(args[0], torch.Tensor) else args


@dataclass
class Event:
    """What a request hears: pieces of text, then one final event with a finish reason."""

    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None  # PEFT adapter name, None for the base model
    deliver: Callable[[Event], None]  # called from the engine thread
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Row:
    """A running sequence: its request, its tokens so far, its sampler state."""

    def __init__(self, request: GenerationRequest, tokenizer: Any) -> None:
        self.request = request
        self.text = TextAssembler(tokenizer, request.params.stop)
        self.generated: list[int] = []
        self.position = len(request.prompt_ids)  # position id of the next token fed in
        seed = request.params.seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.fast_greedy = request.params.greedy and request.params.repetition_penalty == 1.0
        self._seen: torch.Tensor | None = None  # prompt + generated, kept only for the repetition penalty
        self._seen_len = 0

    def seen(self) -> torch.Tensor:
        """The prompt's and the answer's tokens so far, appended to in place (no copy per step)."""
        prompt = self.request.prompt_ids
        total = len(prompt) + len(self.generated)
        if self._seen is None or total > self._seen.numel():
            grown = torch.empty(max(total, len(prompt) + self.request.params.max_tokens), dtype=torch.long)
            grown[:len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            self._seen, self._seen_len = grown, len(prompt)
        if self._seen_len < total:
            self._seen[self._seen_len:total] = torch.tensor(self.generated[self._seen_len - len(prompt):],
                                                            dtype=torch.long)
            self._seen_len = total
        return self._seen[:total]

    def emit(self, text: str = "", finish_reason: str | None = None, error: str | None = None) -> None:
        self.request.deliver(Event(text, finish_reason, len(self.request.prompt_ids), len(self.generated), error))


class BatchEngine:
    """Serves generation requests for one (PEFT-wrapped or plain) causal LM."""

    def __init__(self, model_ref: Callable[[], Any], tokenizer: Any, eos_ids: set[int], *,
                 max_batch_size: int = 64, max_waiting: int = 256, name: str = "engine",
                 fast_paths: bool = True) -> None:
        self.model_ref = model_ref  # the registry may wrap the base in a PeftModel later
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.fast_paths = fast_paths
        self.model_lock = threading.RLock()  # held for each step; adapters change only between steps
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._wake = threading.Condition()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._fast: _FastDecoder | None = None
        self._fast_key: tuple[Any, ...] | None = None
        self._threads: ThreadTuner | None = None  # made on the engine's own thread
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # -- the public side ---------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        with self._wake:
            if self._closing:
                raise ModelNotLoaded("this model is being unloaded")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for this model")
            self._waiting.append(request)
            self._wake.notify()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        return len(self._rows), len(self._waiting)

    def uses_adapter(self, adapter: str) -> bool:
        with self._wake:
            return any(r.adapter == adapter for r in self._waiting) or any(
                row.request.adapter == adapter for row in self._rows)

    def close(self, wait: bool = True) -> None:
        """Finish what runs and waits, then stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if wait:
            self._thread.join()

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        self._threads = ThreadTuner()
        while True:
            with self._wake:
                while not self._waiting and not self._rows and not self._closing:
                    self._wake.wait()
                if self._closing and not self._waiting and not self._rows:
                    self._fast = self._fast_key = None
                    return
                room = self.max_batch_size - len(self._rows)
                joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            try:
                with self.model_lock, torch.inference_mode():
                    self._step(joining)
            except Exception as exc:  # a failed step ends its requests, never the engine
                log.exception("generation step failed")
                for row in self._rows + [_Row(r, self.tokenizer) for r in joining]:
                    row.emit(finish_reason="error", error=f"generation failed: {exc}")
                self._rows, self._cache, self._mask = [], None, None

    def _step(self, joining: list[GenerationRequest]) -> None:
        joining = [r for r in joining if not r.cancelled.is_set()]
        if self._rows:
            tuner = self._threads
            if tuner is not None:
                tuner.before_decode(len(self._rows))
            began = time.perf_counter()
            self._decode()
            if tuner is not None:
                tuner.after_decode(time.perf_counter() - began)
        if joining:
            self._prefill(joining)
        self._drop_finished()

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache, adapters: list[str]) -> torch.Tensor:
        model = self.model_ref()
        kwargs: dict[str, Any] = {}
        if hasattr(model, "peft_config"):
            kwargs["adapter_names"] = adapters
        device = model.device
        # The last position of a longer input is a strided slice; torch multiplies such a 3-d slice by
        # a frozen weight by expanding the weight once per row (a 16-row bf16 prefill took over a
        # second in the output layer alone), so the output layer is handed a contiguous copy.
        head = model.get_output_embeddings() if input_ids.shape[1] > 1 else None
        hook = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
        kwargs[_cache_keyword(model)] = cache
        try:
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device), use_cache=True, logits_to_keep=1, **kwargs)
        finally:
            if hook is not None:
                hook.remove()
        return out.logits[:, -1].float().cpu()

    def _fast_decoder(self) -> _FastDecoder | None:
        """The fast decode step for the model as it is now (adapters come and go between steps)."""
        model = self.model_ref()
        key = (model, tuple(getattr(model, "peft_config", {})))
        if not self.fast_paths:
            return None
        if self._fast_key is None or self._fast_key[0] is not model or self._fast_key[1:] != key[1:]:
            self._fast, self._fast_key = _FastDecoder.for_model(model, self._fast), key
        return self._fast

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        width = max(len(r.prompt_ids) for r in requests)
        pad = next(iter(self.eos_ids))
        ids = torch.full((len(requests), width), pad, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, request in enumerate(requests):
            n = len(request.prompt_ids)
            ids[i, width - n:] = torch.tensor(request.prompt_ids)
            mask[i, width - n:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache,
                               [r.adapter or BASE_ADAPTER for r in requests])
        rows = [_Row(r, self.tokenizer) for r in requests]
        self._merge(rows, cache, mask)
        self._advance(rows, logits)

    def _decode(self) -> None:
        rows = self._rows
        last = torch.tensor([row.generated[-1] for row in rows], dtype=torch.long)
        positions = torch.tensor([row.position for row in rows], dtype=torch.long)
        for row in rows:
            row.position += 1
        assert self._mask is not None and self._cache is not None
        self._mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
        adapters = [row.request.adapter or BASE_ADAPTER for row in rows]
        fast = self._fast_decoder()
        if fast is not None:
            logits = fast.step(last, positions, self._mask, self._cache, adapters)
        else:
            logits = self._forward(last[:, None], self._mask, positions[:, None], self._cache, adapters)
        self._advance(rows, logits)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Choose each row's next token (all plain greedy rows in one argmax) and tell its request."""
        greedy = [i for i, row in enumerate(rows) if row.fast_greedy]
        tokens: list[int] = [0] * len(rows)
        if greedy:
            picked = (logits if len(greedy) == len(rows) else logits[greedy]).argmax(-1).tolist()
            for i, token in zip(greedy, picked, strict=True):
                tokens[i] = token
        for i, row in enumerate(rows):
            if not row.fast_greedy:
                params = row.request.params
                seen = row.seen() if params.repetition_penalty != 1.0 else torch.empty(0, dtype=torch.long)
                tokens[i] = sample_row(logits[i], params, seen, row.generator)
        for row, token in zip(rows, tokens, strict=True):
            params = row.request.params
            row.generated.append(token)
            if token in self.eos_ids:
                row.generated.pop()  # the EOS is not part of the answer
                row.emit(row.text.flush(), finish_reason="stop")
                row.request.cancelled.set()
                continue
            piece, stopped = row.text.add(token)
            if stopped:
                row.emit(piece, finish_reason="stop")
                row.request.cancelled.set()
            elif len(row.generated) >= params.max_tokens:
                row.emit(piece + row.text.flush(), finish_reason="length")
                row.request.cancelled.set()
            elif piece:
                row.emit(piece)

    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add prefilled rows to the running batch, left-padding whichever cache is shorter."""
        if self._cache is None or not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        assert self._mask is not None
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for old_layer, new_layer in zip(self._cache.layers, cache.layers, strict=True):
            for attr in ("keys", "values"):
                a, b = getattr(old_layer, attr), getattr(new_layer, attr)
                a = torch.nn.functional.pad(a, (0, 0, width - old_len, 0))
                b = torch.nn.functional.pad(b, (0, 0, width - new_len, 0))
                setattr(old_layer, attr, torch.cat([a, b], dim=0))
        self._mask = torch.cat([torch.nn.functional.pad(self._mask, (width - old_len, 0)),
                                torch.nn.functional.pad(mask, (width - new_len, 0))], dim=0)
        self._rows = self._rows + rows

    def _drop_finished(self) -> None:
        """Rows that finished or whose client left leave the batch; all-padding columns go too."""
        keep = [i for i, row in enumerate(self._rows) if not row.request.cancelled.is_set()]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        assert self._cache is not None and self._mask is not None
        index = torch.tensor(keep)
        self._mask = self._mask[index]
        start = int((self._mask.sum(0) > 0).nonzero()[0])
        self._mask = self._mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, start:]
            layer.values = layer.values[index.to(layer.values.device), :, start:]
        self._rows = [self._rows[i] for i in keep]


# -- the decode step without the model's generic forward -------------------------------------------


@dataclass
class _AdapterRows:
    """Which rows of a decode step use which adapter, as the LoRA products of `_Group` need it."""

    present: tuple[int, ...]  # the adapters used (indices into the groups' stacks), in increasing order
    gather: torch.Tensor  # the rows of each present adapter in turn, each padded to `width` rows
    width: int
    slots: torch.Tensor | None  # the real (not padding) rows among the gathered ones; None: all are real
    rows: torch.Tensor  # the batch row of each real slot

    @classmethod
    def of(cls, index: list[int], device: torch.device) -> _AdapterRows | None:
        by_adapter: dict[int, list[int]] = {}
        for row, adapter in enumerate(index):
            if adapter:
                by_adapter.setdefault(adapter, []).append(row)
        if not by_adapter:
            return None
        present = tuple(sorted(by_adapter))
        width = max(len(rows) for rows in by_adapter.values())
        gather, slots, real = [], [], []
        for j, adapter in enumerate(present):
            rows = by_adapter[adapter]
            gather += rows + [rows[0]] * (width - len(rows))
            slots += range(j * width, j * width + len(rows))
            real += rows
        padded = len(slots) != len(gather)
        return cls(present, torch.tensor(gather, device=device), width,
                   torch.tensor(slots, device=device) if padded else None, torch.tensor(real, device=device))


class _Group:
    """Linear layers of the decoder that read the same input (q, k and v; gate and up; or one alone).

    On CPU in bf16, their weights are laid out once, side by side, in oneDNN's blocked format: the
    group is one matrix product, bit for bit the products of its members, without the weights being
    re-laid out at every call (the output layer of a one-row step takes a third of the time).

    LoRA: each adapter's A matrices of all members side by side, and its B matrices in blocks, make
    one low-rank pair per adapter, stacked over adapters. A step gathers each adapter's rows (padded
    to the largest group), multiplies them by their own adapter's pair in two batched products, and
    adds the result to those rows: every adapter used costs its own rows' work, not the batch's.
    """

    def __init__(self, modules: list[Any], adapter_index: dict[str, int]) -> None:
        bases = [getattr(m, "base_layer", m) for m in modules]
        self.weights: list[torch.Tensor] = [b.weight for b in bases]
        self.biases: list[torch.Tensor | None] = [b.bias for b in bases]
        self.sizes = [w.shape[0] for w in self.weights]
        self.packed: torch.Tensor | None = None
        self.packed_bias: torch.Tensor | None = None
        self.lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # A [adapters + 1, in, rank],
        # B [adapters + 1, rank, outputs], scaling [adapters + 1, 1, rank]; adapter 0 (none) is zero
        self._subsets: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        blocks: dict[int, list[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
        for i, module in enumerate(modules):
            for name, adapter in adapter_index.items():
                if name in getattr(module, "lora_A", {}):
                    blocks.setdefault(adapter, []).append(
                        (i, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]))
        if not blocks:
            return
        dtypes = {t.dtype for parts in blocks.values() for _, a, b, _ in parts for t in (a, b)}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        device = next(iter(blocks.values()))[0][1].device
        rank = max(sum(a.shape[0] for _, a, _, _ in parts) for parts in blocks.values())
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes) + 1)]
        count = len(adapter_index) + 1
        a_all = torch.zeros(count, self.weights[0].shape[1], rank, dtype=dtype, device=device)
        b_all = torch.zeros(count, rank, starts[-1], dtype=dtype, device=device)
        s_all = torch.zeros(count, 1, rank, dtype=dtype, device=device)
        for adapter, parts in blocks.items():
            column = 0
            for i, a, b, scaling in parts:
                r = a.shape[0]
                a_all[adapter, :, column:column + r] = a.detach().t()
                b_all[adapter, column:column + r, starts[i]:starts[i + 1]] = b.detach().t()
                s_all[adapter, 0, column:column + r] = scaling
                column += r
        self.lora = (a_all, b_all, s_all)

    def pack(self, previous: dict[tuple[int, ...], _Group]) -> None:
        """Lay the weights out for oneDNN, or take the copy a previous decoder made of these very weights."""
        old = previous.get(tuple(id(w) for w in self.weights))
        if old is not None and all(a is b for a, b in zip(old.weights, self.weights, strict=True)):
            self.packed, self.packed_bias = old.packed, old.packed_bias
            return
        weight = self.weights[0] if len(self.weights) == 1 else torch.cat(self.weights, 0)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)
        if any(b is not None for b in self.biases):
            self.packed_bias = torch.cat([b.detach() if b is not None else torch.zeros(
                size, dtype=weight.dtype) for b, size in zip(self.biases, self.sizes, strict=True)])

    def __call__(self, x: torch.Tensor, adapters: _AdapterRows | None) -> torch.Tensor:
        """The members' outputs side by side: [rows, sum of their sizes]."""
        if self.packed is not None:
            out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.packed_bias, "none", [], "")
        elif len(self.weights) == 1:
            out = torch.nn.functional.linear(x, self.weights[0], self.biases[0])
        else:
            out = torch.cat([torch.nn.functional.linear(x, w, b) for w, b in zip(self.weights, self.biases,
                                                                                   strict=True)], -1)
        if adapters is None or self.lora is None:
            return out
        stacks = self._subsets.get(adapters.present)
        if stacks is None:
            keep = torch.tensor(adapters.present, device=self.lora[0].device)
            stacks = tuple(t[keep] for t in self.lora)  # type: ignore[assignment]
            if len(self._subsets) >= 8:
                self._subsets.clear()
            self._subsets[adapters.present] = stacks  # type: ignore[assignment]
        a, b, scaling = stacks
        rows = x.index_select(0, adapters.gather).to(a.dtype).view(len(adapters.present), adapters.width, -1)
        delta = torch.bmm(torch.bmm(rows, a) * scaling, b).view(-1, out.shape[1])
        if adapters.slots is not None:
            delta = delta.index_select(0, adapters.slots)
        return out.index_add_(0, adapters.rows, delta.to(out.dtype))


class _FastDecoder:
    """One decode step (one new token per row) of a Llama-style model, with its LoRA rows batched.

    The model's own forward spends much of a small decode step on generic machinery (mask building,
    module dispatch, one sub-batch per adapter in PEFT's mixed-adapter forward, weights re-laid out
    for every product). This step does the same maths for the architectures it knows, with the
    model's own norms, rotary embedding and weights: attention over the left-padded cache with the
    padding masked, and the projections in `_Group`s. Anything it does not know (another
    architecture, a LoRA variant such as DoRA, adapters on other modules) is left to the model's
    forward. The weights' blocked copies (see `_Group`) are made when they fit in a quarter of the
    free memory.
    """

    ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")
    ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
    MLP = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, model: Any, previous: _FastDecoder | None = None) -> None:
        self.model = model
        lm = model.get_base_model() if hasattr(model, "peft_config") else model
        names = list(getattr(model, "peft_config", {}))
        self.adapter_index = {name: i + 1 for i, name in enumerate(names)}
        inner = lm.model
        self.embed, self.rotary, self.norm = inner.embed_tokens, inner.rotary_emb, inner.norm
        self.lm_head = _Group([lm.lm_head], {})
        self.layers: list[tuple[Any, _Group, _Group, _Group, _Group]] = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((layer, _Group([attn.q_proj, attn.k_proj, attn.v_proj], self.adapter_index),
                                _Group([attn.o_proj], self.adapter_index),
                                _Group([mlp.gate_proj, mlp.up_proj], self.adapter_index),
                                _Group([mlp.down_proj], self.adapter_index)))
        groups = self.groups()
        weights = [w for g in groups for w in g.weights]
        if torch.backends.mkldnn.is_available() and all(
                w.device.type == "cpu" and w.dtype == torch.bfloat16 for w in weights) and sum(
                w.numel() * w.element_size() for w in weights) * 4 <= _free_memory():
            done = {tuple(id(w) for w in g.weights): g for g in previous.groups()} if previous else {}
            try:
                for group in groups:
                    group.pack(done)
            except (RuntimeError, AttributeError):  # a torch without these oneDNN ops: plain products
                for group in groups:
                    group.packed = group.packed_bias = None

    def groups(self) -> list[_Group]:
        return [self.lm_head] + [g for _, *layer_groups in self.layers for g in layer_groups]

    @classmethod
    def for_model(cls, model: Any, previous: _FastDecoder | None = None) -> _FastDecoder | None:
        """The fast step for this model, or None (with a debug line saying why) where its own forward must run."""
        reason = cls.unsupported(model)
        if reason is not None:
            log.debug("fast decode step steps aside: %s", reason)
            return None
        return cls(model, previous)

    @classmethod
    def unsupported(cls, model: Any) -> str | None:
        """Why the fast step cannot run this model, or None when it can."""
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        lm = model.get_base_model() if hasattr(model, "peft_config") else model
        if type(lm).__name__ not in cls.ARCHITECTURES:
            return f"{type(lm).__name__} is not one of {', '.join(cls.ARCHITECTURES)}"
        if lm.training:
            return "the model is in training mode"
        layer_types = getattr(lm.config, "layer_types", None)
        window = getattr(lm.config, "sliding_window", None)
        if any(kind != "full_attention" for kind in layer_types or ()) or (
                layer_types is None and window is not None and window < lm.config.max_position_embeddings):
            return "layers other than full attention (sliding windows)"
        inner = getattr(lm, "model", None)
        if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "rotary_emb", "norm", "layers")):
            return "no embed_tokens, rotary_emb, norm and layers"
        allowed = set()
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if not all(hasattr(attn, a) for a in (*cls.ATTENTION, "scaling", "head_dim")) or not all(
                    hasattr(mlp, a) for a in (*cls.MLP, "act_fn")):
                return "attention or MLP modules of another layout"
            for module in [getattr(attn, n) for n in cls.ATTENTION] + [getattr(mlp, n) for n in cls.MLP]:
                if isinstance(module, BaseTunerLayer):
                    if type(module) is not LoraLinear or module.merged or module.disable_adapters:
                        return f"{type(module).__name__} adapter layer (merged, disabled or not LoRA)"
                    if getattr(module, "fan_in_fan_out", False) or getattr(module, "lora_variant", None) or any(
                            getattr(module, "use_dora", {}).values()) or any(
                            getattr(module, "lora_bias", {}).values()) or getattr(module, "lora_embedding_A", None):
                        return "a LoRA variant (DoRA, LoRA bias, fan-in-fan-out)"
                    if not isinstance(module.base_layer, torch.nn.Linear):
                        return f"a LoRA layer over {type(module.base_layer).__name__}"
                    allowed.add(id(module))
                elif not isinstance(module, torch.nn.Linear):
                    return f"a projection of type {type(module).__name__}"
        for module in lm.modules():
            if isinstance(module, AuxiliaryTrainingWrapper) or (
                    isinstance(module, BaseTunerLayer) and id(module) not in allowed):
                return "adapters on modules other than the attention and MLP projections"
        if not isinstance(lm.lm_head, torch.nn.Linear):
            return f"an output head of type {type(lm.lm_head).__name__}"
        return None

    def step(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: DynamicCache,
             adapters: list[str]) -> torch.Tensor:
        """Last-position logits (float32, [rows, vocab]) for one new token per row; extends the cache.

        ids, positions: [rows]; mask: [rows, cached + 1], 1 where a row has a token.
        """
        device = self.lm_head.weights[0].device
        ids, positions, mask = ids.to(device), positions.to(device), mask.to(device)
        index = [self.adapter_index.get(a, 0) for a in adapters]
        rows = _AdapterRows.of(index, device)
        n = ids.shape[0]
        hidden = self.embed(ids)  # [rows, hidden]
        cos, sin = self.rotary(hidden, positions[:, None])  # [rows, 1, head_dim], broadcast over heads
        padding = torch.zeros(mask.shape, dtype=torch.float32, device=device)
        padding.masked_fill_(mask == 0, torch.finfo(torch.float32).min)
        padding = padding[:, None, None, :]
        for (layer, qkv, o_proj, gate_up, down), cached in zip(self.layers, cache.layers, strict=True):
            attn = layer.self_attn
            head_dim = attn.head_dim
            half = head_dim // 2
            q, k, v = qkv(layer.input_layernorm(hidden), rows).split(qkv.sizes, -1)
            q, k, v = q.view(n, -1, head_dim), k.view(n, -1, head_dim), v.view(n, -1, head_dim)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), -1) * sin
            keys = cached.keys = torch.cat([cached.keys, k[:, :, None]], 2)  # [rows, kv heads, length, head_dim]
            values = cached.values = torch.cat([cached.values, v[:, :, None]], 2)
            grouped = q.view(n, keys.shape[1], -1, head_dim)  # the query heads that share each kv head
            scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * attn.scaling + padding
            weights = scores.softmax(-1).to(values.dtype)
            hidden = hidden + o_proj(torch.matmul(weights, values).reshape(n, -1), rows)
            gate, up = gate_up(layer.post_attention_layernorm(hidden), rows).split(gate_up.sizes, -1)
            hidden = hidden + down(layer.mlp.act_fn(gate) * up, rows)
        return self.lm_head(self.norm(hidden), None).float().cpu()
