"""The engine's CPU operators in C++ (`csrc/cpu_kernels.cpp`), built on first use: decode attention read
straight from the block pool, and Llama's RMSNorm and rotary embedding each in one pass.

Without them, decoding rows attend through padded batch views gathered from the pool (`paged.attend`):
the gather writes every row's keys and values once more and the products read them again, three
passes over the cache where one would do, with each row padded to its group's longest context.
The operator reads each row's blocks in place through its block table, in float32, one (row, kv head)
pair per task of PyTorch's own thread pool: what vLLM's CPU backend does with its C++ attention.
The norm (with the residual add before it) and the rotary embedding replace eight and fourteen small
operators a layer, each of which costs PyTorch's dispatch and a trip back to Python for the GIL: on
two cores, at 16 to 64 rows, that overhead is a sizeable share of a decode step. `decode_layers` runs
every layer of a decode step in one call: no return to Python between operators, so the HTTP event loop,
which holds the GIL while it streams the last step's tokens, no longer stalls the step at each operator.

PyTorch builds it with the machine's C++ compiler (`torch.utils.cpp_extension`, ninja) into its
extensions cache, once per machine: about 15 s on two cores, then a load of the library. It is built
for this CPU (`-march=native`), so the cache entry's name carries the CPU's model and flags. Where the
build fails (no compiler, no ninja, no headers), a warning says why and the engine takes PyTorch's operators.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]  # for this CPU; exp vectorized; PyTorch's OpenMP
_build_lock = threading.Lock()  # two models loading at once build it once


def _cpu_identity() -> str:
    """The CPU's model and instruction set flags, as /proc/cpuinfo gives them (empty where it cannot be read)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def available() -> bool:
    """Whether the operators are loaded (`torch.ops.gpt_service_cpu`), building them first where needed."""
    with _build_lock:
        return _build()


def build_folder() -> Path:
    """Where the operators are built: PyTorch's extensions folder, under a name for this CPU, torch and Python."""
    from torch.utils import cpp_extension

    identity = "\n".join((_cpu_identity(), torch.__version__, sys.version))
    name = "gpt_service_cpu_" + hashlib.sha256(identity.encode()).hexdigest()[:12]
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / name


@functools.cache
def _build() -> bool:
    from torch.utils import cpp_extension

    folder = build_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # PyTorch's own lock is a file that a builder killed midway leaves behind, and every later build
        # waits on it forever. Ours is an flock, which dies with its process: whoever holds it is the only
        # builder, so a `lock` file found under it is such a leftover.
        with (folder / "builder.flock").open("w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            (folder / "lock").unlink(missing_ok=True)
            cpp_extension.load(folder.name, [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                               build_directory=str(folder), is_python_module=False)
    except Exception as exc:  # any failure to build or load leaves PyTorch's operators
        log.warning("CPU kernels not built (%s: %s); the engine runs PyTorch's operators instead",
                    type(exc).__name__, str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
        return False
    return True


def decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor,
           scaling: float) -> torch.Tensor:
    """Attention of one new token per row over its cached context: [rows, heads, head_dim].

    q: [rows, heads, head_dim]; keys, values: one layer's pool, [kv_heads, blocks, block_size, head_dim];
    tables: [rows, most blocks] (padded past each row's blocks); lengths: [rows], the tokens each row attends to.
    """
    return torch.ops.gpt_service_cpu.decode(q, keys, values, tables, lengths, scaling)


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """`norm(x)` for a Llama-style RMSNorm module (`weight`, `variance_epsilon`); x: [rows, width]."""
    return torch.ops.gpt_service_cpu.rms_norm(x, norm.weight, norm.variance_epsilon)


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """Add `residual` to x in place, and return `norm(x)`."""
    return torch.ops.gpt_service_cpu.add_rms_norm_(x, residual, norm.weight, norm.variance_epsilon)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x ([tokens, heads, head_dim], heads contiguous) in place: x * cos + rotate_half(x) * sin, where
    cos and sin ([tokens, head_dim]) are the model's rotary embedding at each token's position."""
    torch.ops.gpt_service_cpu.rotary_(x, cos, sin)


def decode_layers(hidden: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                  norms: list[torch.Tensor], eps: list[float], cos: torch.Tensor, sin: torch.Tensor,
                  keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor, tables: torch.Tensor,
                  lengths: torch.Tensor, scaling: float, heads: int, kv_heads: int,
                  lora_a: list[torch.Tensor | None], lora_b: list[torch.Tensor | None],
                  lora_scaling: list[torch.Tensor | None], lora_gather: torch.Tensor | None,
                  lora_slots: torch.Tensor | None, lora_rows: torch.Tensor | None, lora_width: int) -> torch.Tensor:
    """Every decoder layer of a step that feeds one token per row; `hidden` (the rows' embeddings, [rows, width])
    is updated in place and returned.

    weights, biases: per layer, the q/k/v, o, gate/up and down products (weights laid out by oneDNN's
    `_reorder_linear_weight`, the members of each side by side); norms, eps: per layer, the input and
    post-attention RMSNorm; keys, values: the pool's layers; slots, tables, lengths: as `decode` and
    `KVPool.write` take them. The MLP's activation is SiLU. lora_*: per product, the stacks of the adapters
    the rows use (`Group.stacks`), and the rows' `AdapterRows` (gather, slots, rows, width), as `Group`
    applies them; None where no row has an adapter.
    """
    return torch.ops.gpt_service_cpu.decode_layers(hidden, weights, biases, norms, eps, cos, sin, keys, values, slots,
                                                   tables, lengths, scaling, heads, kv_heads, lora_a, lora_b,
                                                   lora_scaling, lora_gather, lora_slots, lora_rows, lora_width)
