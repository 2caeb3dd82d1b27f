"""Shared fixtures: the tiny demo model, built once per test session, and small datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt_service.demo_model import build_demo_model

REPO = Path(__file__).resolve().parent.parent

QA_PAIRS = [
    ("你好", "你好！有什么可以帮助你的吗？"),
    ("介绍一下Python", "Python是一种高级编程语言，简洁易读。"),
    ("什么是LoRA", "LoRA是一种低秩适配方法。"),
    ("1加1等于几", "1加1等于2。"),
    ("Hello", "Hello! How can I help you today?"),
    ("What is the capital of France?", "Paris."),
    ("谢谢", "不客气！"),
    ("Say goodbye", "Goodbye! Have a nice day."),
]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")


def write_json(path: Path, payload: object) -> Path:
    path.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def qa_prompt(question: str) -> str:
    return f"用户：{question}\n助手："


@pytest.fixture
def qa_records() -> list[dict]:
    return [{"prompt": qa_prompt(q), "completion": a} for q, a in QA_PAIRS]


@pytest.fixture
def text_records() -> list[dict]:
    return [{"text": qa_prompt(q) + a} for q, a in QA_PAIRS]
