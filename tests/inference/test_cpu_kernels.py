"""The CPU kernels' norm and rotary embedding equal the models' own modules (Llama's; Qwen2 and Mistral share them),
and a decode step's layers in one call equal them operator by operator, for each family the fast decoder serves."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from gpt_service.inference import cpu_kernels
from gpt_service.inference.fast_decoder import FastDecoder
from gpt_service.inference.kv_cache import BlockTable
from gpt_service.inference.paged import PagedBatch
from gpt_service.inference.sampling import SamplingParams
from gpt_service.inference.sequence import GenerationRequest, Sequence
from tests.families.models import build

# bf16: one rounding of the result against the modules' two or three (2^-8 relative each)
TOLERANCE = {torch.float32: {}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


@pytest.fixture(autouse=True)
def built() -> None:
    assert cpu_kernels.available(), "the CPU kernels did not build: see the warning logged"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_and_the_residual_add_before_it_equal_the_models_norm(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    torch.nn.init.normal_(norm.weight)
    hidden, residual = torch.randn(13, 96).to(dtype) * 3, torch.randn(13, 96).to(dtype)
    with torch.inference_mode():
        torch.testing.assert_close(cpu_kernels.rms_norm(hidden, norm), norm(hidden), **TOLERANCE[dtype])
        summed = hidden + residual
        normed = cpu_kernels.add_rms_norm_(hidden, residual, norm)
        torch.testing.assert_close(hidden, summed, rtol=0, atol=0)  # added in place, rounded as PyTorch rounds
        torch.testing.assert_close(normed, norm(summed), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rotary_rotates_queries_and_keys_in_place_as_the_model_does(dtype: torch.dtype) -> None:
    """The queries (4 heads) and keys (2) side by side in the q, k and v products' output, as the forward
    rotates them, at scattered positions."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    rotary = LlamaRotaryEmbedding(config)
    tokens, dim = 7, 32
    qkv = torch.randn(tokens, (4 + 2 + 2) * dim).to(dtype)
    positions = torch.tensor([0, 1, 5, 100, 101, 2047, 3000])
    with torch.inference_mode():
        cos, sin = rotary(qkv, positions[:, None])  # [tokens, 1, head_dim]
        q, k = qkv[:, :4 * dim].view(tokens, 4, dim), qkv[:, 4 * dim:6 * dim].view(tokens, 2, dim)
        expected_q, expected_k = apply_rotary_pos_emb(q, k, cos[:, 0], sin[:, 0], unsqueeze_dim=1)
        values = qkv[:, 6 * dim:].clone()
        cpu_kernels.rotary_(qkv[:, :6 * dim].view(tokens, 6, dim), cos.view(tokens, -1), sin.view(tokens, -1))
    torch.testing.assert_close(qkv[:, :4 * dim].view(tokens, 4, dim), expected_q, **TOLERANCE[dtype])
    torch.testing.assert_close(qkv[:, 4 * dim:6 * dim].view(tokens, 2, dim), expected_k, **TOLERANCE[dtype])
    assert torch.equal(qkv[:, 6 * dim:], values)  # the values are not touched


@pytest.mark.parametrize("adapters", [(), ("one", "two")], ids=["base", "two-adapters"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_a_decode_steps_layers_in_one_call_equal_them_operator_by_operator(family: str, adapters: tuple[str, ...],
                                                                           tmp_path: Path) -> None:
    """The same logits and the same keys and values in the pool, bit for bit (bf16, where the products are laid out
    for oneDNN): 1, 5 and 16 rows of 3 to 70 tokens, their blocks scattered over the pool, and with adapters the
    rows spread over two random LoRA adapters (on every projection) and the base. Qwen2 has q, k and v biases and
    tied embeddings."""
    model = AutoModelForCausalLM.from_pretrained(build(family, tmp_path / family), dtype=torch.bfloat16).eval()
    torch.manual_seed(0)
    if adapters:  # random A and B: each adapter changes every projection
        config = LoraConfig(r=4, lora_alpha=8, target_modules=[*FastDecoder.ATTENTION, *FastDecoder.MLP],
                            init_lora_weights=False)
        model = get_peft_model(model, config, adapter_name=adapters[0])
        model.add_adapter(adapters[1], config)
        model.eval()
    decoder = FastDecoder(model)
    operands = decoder.in_one_call
    assert operands is not None
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 5, 16):
        lengths = torch.randint(3, 70, (rows,), generator=generator).tolist()
        blocks = torch.randperm(400, generator=generator).tolist()
        work = []
        for length in lengths:
            adapter = ([None, *adapters] * rows)[len(work) % (len(adapters) + 1)]
            seq = Sequence(GenerationRequest(torch.randint(0, 500, (length,), generator=generator).tolist(),
                                             SamplingParams(), adapter, lambda e: None), tokenizer=None)
            seq.computed, seq.table = length - 1, BlockTable([blocks.pop() for _ in range(-(-length // 4))])
            work.append((seq, 1))
        results = []
        for one_call in (operands, None):
            pool = decoder.pool(400, 4)
            filler = torch.Generator().manual_seed(rows)  # the earlier tokens' keys and values, the same for both
            for keys, values in zip(pool.keys, pool.values, strict=True):
                keys.normal_(generator=filler)
                values.normal_(generator=filler)
            decoder.in_one_call = one_call
            with torch.inference_mode():
                logits = decoder.forward(PagedBatch.of(work, 4, torch.device("cpu"), kernels=True), pool)
            results.append((logits, pool))
        (fused, fused_pool), (stepwise, stepwise_pool) = results
        assert torch.equal(fused, stepwise), rows
        assert all(torch.equal(a, b) for a, b in zip(fused_pool.keys + fused_pool.values,
                                                      stepwise_pool.keys + stepwise_pool.values, strict=True))


def test_kernels_that_do_not_build_leave_pytorchs_operators(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A source the compiler rejects (as a machine without a compiler or headers would fail): a warning that says
    so, and `available()` false, so that the runner takes PyTorch's operators."""
    broken = tmp_path / "cpu_kernels.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    monkeypatch.setattr(cpu_kernels, "_cpu_identity", lambda: "a test's broken build")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    cpu_kernels._build.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
            assert not cpu_kernels.available()
    finally:
        cpu_kernels._build.cache_clear()
    assert "CPU kernels not built" in caplog.text


BUILD = "from gpt_service.inference import cpu_kernels; raise SystemExit(0 if cpu_kernels.available() else 1)"


@pytest.mark.slow
def test_a_builder_killed_midway_does_not_stop_the_next_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A process killed while it builds (a server stopped during its first load) leaves PyTorch's lock file; the
    next build (in a process of its own: one process loads the operators once) must not wait on it forever."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    builder = subprocess.Popen([sys.executable, "-c", BUILD])
    lock = cpu_kernels.build_folder() / "lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and builder.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.exists(), "the builder did not start building"
    builder.kill()
    builder.wait()
    assert lock.exists()  # left behind
    assert subprocess.run([sys.executable, "-c", BUILD], timeout=600).returncode == 0
    assert not lock.exists()
