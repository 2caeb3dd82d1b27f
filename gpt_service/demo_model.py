"""A tiny Qwen2 model with a byte-level BPE tokenizer, built offline from a fixed seed.

Used by `gpt-service demo-model DIR`, the quickstart and every test fixture, so the whole flow
runs without a model hub. Two choices matter (DESIGN.md, "Two traps"): a large
`initializer_range` so that a LoRA can make the random model confident, and a generation config
that names the EOS ids so `generate` stops after an answer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
hf_logging.disable_progress_bar()

# ChatML, as Qwen2 uses it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "用户：你好\n助手：你好！有什么可以帮助你的吗？",
    "用户：介绍一下Python\n助手：Python是一种高级编程语言，语法简洁，应用广泛。",
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
    "Question: what does LoRA train? Answer: small low-rank matrices beside frozen weights.",
    "训练 模型 数据 学习率 批次 评估 生成 适配器 检查点 验证 损失 今天 天气 很好 谢谢 再见",
    "system user assistant def return import print for while if else class self None True",
    "0123456789 + - * / = , . ; : ! ? ( ) [ ] { } < > \" ' # @ % & | ~ ` ^ $ _",
]


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any UTF-8 text encodes) with Qwen2's special tokens."""
    specials = [EOS_TOKEN, IM_START, IM_END]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def build_demo_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
    num_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Write a ready-to-load model folder (safetensors, tokenizer, chat template) to `out_dir`.

    vLLM's CPU attention needs heads of 32 dimensions or more: `num_heads=2` (at hidden 64) gives them.
    """
    out = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size)
    eos_ids = [tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(IM_END)]
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=min(2, num_heads),
        max_position_embeddings=2048,
        initializer_range=0.3,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_ids[0],
        # No pad_token_id: the embedding row of a padding index is zeroed at init, and with tied
        # weights a zero row is an EOS logit stuck at 0 that no LoRA can raise.
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=eos_ids[0], do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
