"""Serving against a real server: registry, /generate, batching across adapters, the openai package, refusals."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpt_service.config import build_train_config
from gpt_service.demo_model import build_demo_model
from gpt_service.training import run_lora_finetune
from tests.conftest import (
    QA_PAIRS,
    Server,
    free_port,
    make_workspace,
    qa_prompt,
    server_environment,
    write_json,
    write_jsonl,
)

pytestmark = pytest.mark.slow  # end-to-end: real servers, scripts and trainings

OTHER_ANSWERS = [(q, f"答案{i}：{a[::-1]}") for i, (q, a) in enumerate(QA_PAIRS)]
CHAT_PAIRS = [("hi", "Hello from the chat adapter."), ("name?", "I am GPT Service."),
              ("color?", "Blue, like the sky."), ("bye", "See you soon!")]


def train_adapter(workspace: Path, name: str, dataset: Path) -> str:
    config = build_train_config({
        "base_model": str(workspace / "models/tiny"), "dataset_path": str(dataset),
        "output_dir": str(workspace / "models" / name), "num_epochs": 100, "batch_size": 8,
        "learning_rate": 1e-2, "validation_split": 0, "lr_scheduler_type": "constant",
        "lora_config": {"target_modules": "all-linear", "lora_dropout": 0},
    }, config_path="")
    return str(Path(run_lora_finetune(config).adapter_dir).relative_to(workspace))


@pytest.fixture(scope="module")
def served_workspace(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    workspace = make_workspace(tmp_path_factory.mktemp("serve") / "ws", tiny_model)
    data = workspace / "data"
    qa = write_jsonl(data / "a.jsonl", [{"prompt": qa_prompt(q), "completion": a} for q, a in QA_PAIRS])
    other = write_jsonl(data / "b.jsonl", [{"prompt": qa_prompt(q), "completion": a} for q, a in OTHER_ANSWERS])
    chat = write_json(data / "chat.json", [{"messages": [{"role": "user", "content": q},
                                                         {"role": "assistant", "content": a}]} for q, a in CHAT_PAIRS])
    adapters = {"a": train_adapter(workspace, "a", qa), "b": train_adapter(workspace, "b", other),
                "chat": train_adapter(workspace, "chat", chat)}
    build_demo_model(workspace / "models" / "other-base", hidden_size=32, seed=1)
    return {"workspace": workspace, "adapters": adapters}


@pytest.fixture(scope="module")
def srv(served_workspace: dict, hub_cache: Path) -> Iterator[Server]:

    env = server_environment(hub_cache, GPT_SERVICE_SERVE_DTYPE="float32")
    server = Server(served_workspace["workspace"], free_port(), env).start()
    adapters = served_workspace["adapters"]
    for name, adapter in [("base", None), ("a", adapters["a"]), ("b", adapters["b"]), ("chat", adapters["chat"])]:
        response = requests.post(f"{server.url}/models/load", json={
            "model_name": name, "model_path": "models/tiny", "lora_adapter": adapter}, timeout=120)
        assert response.ok, response.text
    yield server
    server.stop()


def generate(server: Server, model: str, prompt: str, **extra) -> dict:
    response = requests.post(f"{server.url}/generate", json={"prompt": prompt, "model_name": model,
                                                              "max_tokens": 48, **extra}, timeout=120)
    assert response.ok, response.text
    return response.json()


def peft_greedy(workspace: Path, adapter: str | None, prompt: str, max_new_tokens: int = 48) -> str:
    tokenizer = AutoTokenizer.from_pretrained(workspace / "models/tiny")
    model = AutoModelForCausalLM.from_pretrained(workspace / "models/tiny")
    if adapter:
        model = PeftModel.from_pretrained(model, workspace / adapter)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_one_base_many_adapters_each_matches_peft(srv: Server, served_workspace: dict) -> None:
    models = requests.get(f"{srv.url}/models", timeout=10).json()["models"]
    assert {m["model_name"] for m in models} == {"base", "a", "b", "chat"}
    assert len({m["base_model"] for m in models}) == 1
    a = next(m for m in models if m["model_name"] == "a")
    assert a["adapter_memory_bytes"] < a["base_memory_bytes"] and set(a["shared_with"]) == {"base", "b", "chat"}

    prompt = qa_prompt(QA_PAIRS[0][0])
    texts = {name: generate(srv, name, prompt)["text"] for name in ("base", "a", "b")}
    assert len(set(texts.values())) == 3
    adapters = served_workspace["adapters"]
    for name, adapter in [("base", None), ("a", adapters["a"]), ("b", adapters["b"])]:
        assert texts[name] == peft_greedy(served_workspace["workspace"], adapter, prompt), name
    assert texts["a"] == QA_PAIRS[0][1]


def test_the_guides_generate_call(srv: Server) -> None:
    response = requests.post(f"{srv.url}/generate", json={
        "prompt": "用户：你好\n助手：", "model_name": "a", "max_tokens": 512}, timeout=60)
    body = response.json()
    assert body["text"] == "你好！有什么可以帮助你的吗？"
    assert body["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] > 0 and body["usage"]["prompt_tokens"] > 0


def test_concurrent_requests_across_adapters_match_each_alone(srv: Server) -> None:
    jobs = [(name, qa_prompt(q)) for q, _ in QA_PAIRS[:4] for name in ("base", "a", "b")]
    alone = [generate(srv, name, prompt)["text"] for name, prompt in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: generate(srv, *job)["text"], jobs))
    assert together == alone


def test_streaming_gives_the_same_text_in_pieces(srv: Server) -> None:
    prompt = qa_prompt(QA_PAIRS[1][0])
    with requests.post(f"{srv.url}/generate", json={"prompt": prompt, "model_name": "a", "max_tokens": 48,
                                                     "stream": True}, stream=True, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert len(payloads) > 2 and payloads[-1]["finish_reason"] == "stop"
    assert "".join(p["text"] for p in payloads) == QA_PAIRS[1][1]


def test_sampling_with_a_seed_repeats_and_stop_cuts(srv: Server) -> None:
    prompt = qa_prompt("随便说点什么")
    first = generate(srv, "base", prompt, temperature=1.0, top_p=0.9, top_k=50, seed=7)["text"]
    assert generate(srv, "base", prompt, temperature=1.0, top_p=0.9, top_k=50, seed=7)["text"] == first
    assert generate(srv, "base", prompt, temperature=1.0, seed=8)["text"] != first
    answer = QA_PAIRS[0][1]
    cut = generate(srv, "a", qa_prompt(QA_PAIRS[0][0]), stop=["有什么"])
    assert cut["text"] == answer[: answer.index("有什么")] and cut["finish_reason"] == "stop"


def test_openai_package_completions_and_chat(srv: Server) -> None:
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
    assert {m.id for m in client.models.list()} == {"base", "a", "b", "chat"}

    completion = client.completions.create(model="a", prompt=qa_prompt(QA_PAIRS[2][0]), max_tokens=48,
                                           temperature=0)
    assert completion.choices[0].text == QA_PAIRS[2][1] and completion.usage.completion_tokens > 0
    pieces = [c.choices[0].text for c in client.completions.create(
        model="a", prompt=qa_prompt(QA_PAIRS[2][0]), max_tokens=48, temperature=0, stream=True)]
    assert "".join(pieces) == QA_PAIRS[2][1]

    question, answer = CHAT_PAIRS[1]
    chat = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": question}],
                                          max_tokens=48, temperature=0)
    assert chat.choices[0].message.content == answer and chat.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": question}],
                                            max_tokens=48, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].usage.completion_tokens > 0

    several = client.completions.create(model="base", prompt="hello", max_tokens=8, n=3, seed=1, temperature=1)
    assert sorted(c.index for c in several.choices) == [0, 1, 2]
    streamed = ["", "", ""]  # the same choices streamed: their pieces interleaved, each choice's text the same
    for chunk in client.completions.create(model="base", prompt="hello", max_tokens=8, n=3, seed=1, temperature=1,
                                           stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == [c.text for c in sorted(several.choices, key=lambda c: c.index)]

    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="x", max_tokens=4)
    assert "not loaded" in missing.value.body["message"]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="a", prompt="x", max_tokens=5000)
    assert "2048" in too_long.value.body["message"]


@pytest.mark.parametrize(("body", "code", "words"), [
    ({"max_tokens": 0}, 422, "max_tokens"),
    ({"max_tokens": -5}, 422, "max_tokens"),
    ({"max_tokens": 10**9}, 400, "at most"),
    ({"max_tokens": 2045}, 400, "context of 2048"),
    ({"model_name": "missing"}, 404, "not loaded"),
    ({"temperature": -1}, 422, "temperature"),
    ({"stop": ["x"] * 9}, 400, "at most 8"),
    ({"n": 2}, 422, "n: unknown field"),
])
def test_generate_refusals(srv: Server, body: dict, code: int, words: str) -> None:
    response = requests.post(f"{srv.url}/generate", json={"prompt": "用户：你好\n助手：", "model_name": "a",
                                                           **body}, timeout=30)
    assert response.status_code == code, response.text
    assert words in response.json()["detail"]


def test_load_refusals(srv: Server, served_workspace: dict) -> None:
    url = f"{srv.url}/models/load"
    taken = requests.post(url, json={"model_name": "a", "model_path": "models/tiny"}, timeout=60)
    assert taken.status_code == 409 and "already loaded" in taken.json()["detail"]
    mismatch = requests.post(url, json={"model_name": "x", "model_path": "models/other-base",
                                        "lora_adapter": served_workspace["adapters"]["a"]}, timeout=60)
    assert mismatch.status_code == 400
    assert "models/tiny" in mismatch.json()["detail"] and "models/other-base" in mismatch.json()["detail"]
    outside = requests.post(url, json={"model_name": "x", "model_path": "models/tiny",
                                       "lora_adapter": "../../etc"}, timeout=60)
    assert outside.status_code == 403
    missing = requests.post(url, json={"model_name": "x", "model_path": "Org/NotCached"}, timeout=60)
    assert missing.status_code == 400 and "GPT_SERVICE_ALLOW_DOWNLOADS" in missing.json()["detail"]


def test_the_guides_load_call_with_a_hub_id_from_the_cache(srv: Server, served_workspace: dict) -> None:
    response = requests.post(f"{srv.url}/models/load", json={
        "model_name": "my-fine-tuned-model", "model_path": "Qwen/Qwen2-7B-Instruct"}, timeout=60)
    assert response.ok, response.text
    prompt = "用户：你好\n助手："
    assert generate(srv, "my-fine-tuned-model", prompt)["text"] == generate(srv, "base", prompt)["text"]
    assert requests.delete(f"{srv.url}/models/my-fine-tuned-model", timeout=30).ok


def test_replace_unload_and_unload_while_generating(srv: Server, served_workspace: dict) -> None:
    url = f"{srv.url}/models/load"
    adapters = served_workspace["adapters"]
    assert requests.post(url, json={"model_name": "tmp", "model_path": "models/tiny",
                                    "lora_adapter": adapters["a"]}, timeout=60).ok
    assert requests.post(url, json={"model_name": "tmp", "model_path": "models/tiny",
                                    "lora_adapter": adapters["b"], "replace": True}, timeout=60).ok
    prompt = qa_prompt(QA_PAIRS[3][0])
    assert generate(srv, "tmp", prompt)["text"] == generate(srv, "b", prompt)["text"]

    worker, result = start_a_running_generation(srv, "tmp")
    assert requests.post(f"{srv.url}/models/unload", json={"model_name": "tmp"}, timeout=30).ok
    assert generate_status(srv, "tmp") == 404
    worker.join(120)
    assert result["finish_reason"] in ("stop", "length") and result["usage"]["completion_tokens"] > 0
    assert requests.delete(f"{srv.url}/models/tmp", timeout=30).status_code == 404


def start_a_running_generation(server: Server, model: str) -> tuple[threading.Thread, dict]:
    """A long sampled generation, seen running before this returns (a seed whose text ends at once is skipped)."""
    for seed in range(3, 23):
        result: dict = {}
        worker = threading.Thread(target=lambda seed=seed, result=result: result.update(
            generate(server, model, "x", max_tokens=1500, temperature=1.0, seed=seed)))
        worker.start()
        while worker.is_alive():
            if running(server):
                return worker, result
            time.sleep(0.02)
        worker.join()
    raise AssertionError(f"every sampled generation of {model} ended before it was seen running")


def generate_status(server: Server, model: str) -> int:
    return requests.post(f"{server.url}/generate", json={"prompt": "x", "model_name": model}, timeout=30).status_code


def running(server: Server, model: str | None = None) -> int:
    return sum(m["running"] for m in requests.get(f"{server.url}/models", timeout=10).json()["models"]
               if model in (None, m["model_name"]))


def wait_until_idle(server: Server, model: str, what: str) -> None:
    deadline = time.monotonic() + 60
    while running(server, model):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_client_that_disconnects_leaves_the_batch(srv: Server) -> None:
    wait_until_idle(srv, "base", "earlier requests for base still generating")
    lengths = {seed: generate(srv, "base", "x", max_tokens=1900, temperature=1, seed=seed)["usage"]["completion_tokens"]
               for seed in range(8)}
    seed = max(lengths, key=lambda s: lengths[s])  # the longest sampled text (seeded sampling repeats)
    assert lengths[seed] >= 300
    finished_tokens = srv.metric("gpt_service_generated_tokens", model="base")
    with requests.post(f"{srv.url}/generate", json={"prompt": "x", "model_name": "base", "max_tokens": 1900,
                                                     "temperature": 1, "seed": seed, "stream": True},
                       stream=True, timeout=60) as response:
        first = json.loads(next(line for line in response.iter_lines() if line).removeprefix(b"data: "))
        assert "finish_reason" not in first  # generating when the client goes
    wait_until_idle(srv, "base", "the abandoned request is still generating")
    # a request that ran to its end would have counted its tokens; a dropped one counts none
    assert srv.metric("gpt_service_generated_tokens", model="base") == finished_tokens


def test_a_full_queue_answers_429_with_retry_after(served_workspace: dict, server_env: dict[str, str]) -> None:
    env = server_env | {"GPT_SERVICE_MAX_WAITING_REQUESTS": "1", "GPT_SERVICE_MAX_BATCH_SIZE": "1"}
    server = Server(served_workspace["workspace"], free_port(), env).start()
    try:
        assert requests.post(f"{server.url}/models/load", json={"model_name": "base", "model_path": "models/tiny"},
                             timeout=120).ok
        body = {"prompt": "x", "model_name": "base", "max_tokens": 300, "temperature": 1.0}
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: requests.post(f"{server.url}/generate", json=body, timeout=120),
                                    range(8)))
            assert requests.get(f"{server.url}/health", timeout=10).ok
        codes = sorted(a.status_code for a in answers)
        assert 200 in codes and 429 in codes, codes
        refused = next(a for a in answers if a.status_code == 429)
        assert refused.headers["Retry-After"] == "1" and "waiting" in refused.json()["detail"]
    finally:
        server.stop()
