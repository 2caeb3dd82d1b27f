"""The vLLM backend against a real vLLM server (CPU): one server per base, adapters trained by our recipe.

A tiny Qwen2 with heads of 32 dimensions (vLLM's CPU attention refuses the demo model's 16) is
served twice by one `gpt-service serve`: by vLLM (the server's default backend here) and by our
builtin engine, so every vLLM answer is checked against our engine's, in fp32. One vLLM server is
started for the whole module (a start takes a minute on CPU); the tests that kill it and unload it
come last.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gpt_service.demo_model import build_demo_model
from tests.conftest import QA_PAIRS, Server, free_port, qa_prompt, server_environment, write_jsonl
from tests.service.test_serving_api import OTHER_ANSWERS, generate, train_adapter
from tests.vllm_venv import vllm_python

pytestmark = pytest.mark.slow  # end-to-end: real servers, vLLM and trainings

PROMPTS = [qa_prompt(q) for q, _ in QA_PAIRS[:3]]
MAX_RUNNING, MAX_WAITING = 4, 4  # so that a burst of requests meets the 429


@pytest.fixture(scope="module")
def vllm_workspace(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workspace = tmp_path_factory.mktemp("vllm") / "ws"
    build_demo_model(workspace / "models" / "tiny", num_heads=2)
    data = workspace / "data"
    data.mkdir()
    qa = write_jsonl(data / "a.jsonl", [{"prompt": qa_prompt(q), "completion": a} for q, a in QA_PAIRS])
    other = write_jsonl(data / "b.jsonl", [{"prompt": qa_prompt(q), "completion": a} for q, a in OTHER_ANSWERS])
    build_demo_model(workspace / "models" / "other-base", num_heads=2, seed=1)
    return {"workspace": workspace, "a": train_adapter(workspace, "a", qa), "b": train_adapter(workspace, "b", other)}


def load(server: Server, name: str, adapter: str | None = None, **extra: object) -> requests.Response:
    return requests.post(f"{server.url}/models/load", json={
        "model_name": name, "model_path": "models/tiny", "lora_adapter": adapter, **extra}, timeout=900)


@pytest.fixture(scope="module")
def vsrv(vllm_workspace: dict, hub_cache: Path) -> Iterator[Server]:
    env = server_environment(
        hub_cache, GPT_SERVICE_SERVE_DTYPE="float32", GPT_SERVICE_SERVING_BACKEND="vllm",
        GPT_SERVICE_VLLM_PYTHON=str(vllm_python()), GPT_SERVICE_MAX_BATCH_SIZE=str(MAX_RUNNING),
        GPT_SERVICE_MAX_WAITING_REQUESTS=str(MAX_WAITING), VLLM_CPU_KVCACHE_SPACE="1")
    server = Server(vllm_workspace["workspace"], free_port(), env).start()
    try:
        for name, adapter in [("base", None), ("a", vllm_workspace["a"]), ("b", vllm_workspace["b"])]:
            assert load(server, name, adapter).ok
            assert load(server, f"builtin-{name}", adapter, backend="builtin").ok
        yield server
    finally:
        server.stop()


def models(server: Server) -> dict[str, dict]:
    return {m["model_name"]: m for m in requests.get(f"{server.url}/models", timeout=10).json()["models"]}


def test_one_vllm_server_per_base_answers_as_our_engine(vsrv: Server) -> None:
    served = models(vsrv)
    assert {n: m["backend"] for n, m in served.items()} == {
        "base": "vllm", "a": "vllm", "b": "vllm", "builtin-base": "builtin", "builtin-a": "builtin",
        "builtin-b": "builtin"}
    assert len({served[n]["vllm"]["pid"] for n in ("base", "a", "b")}) == 1 and served["a"]["vllm"]["alive"]
    assert served["a"]["context_length"] == 2048 and set(served["a"]["shared_with"]) == {"base", "b"}
    for (_, answer), (_, other), prompt in zip(QA_PAIRS, OTHER_ANSWERS, PROMPTS, strict=False):
        texts = {name: generate(vsrv, name, prompt)["text"] for name in served}
        assert texts["a"] == answer and texts["b"] == other  # the adapters' training answers
        for name in ("base", "a", "b"):
            assert texts[name] == texts[f"builtin-{name}"], (name, prompt)
    body = generate(vsrv, "a", PROMPTS[0])
    assert body["finish_reason"] == "stop" and body["usage"]["prompt_tokens"] > 0
    assert body["usage"]["completion_tokens"] > 0


def test_openai_completions_and_streams(vsrv: Server) -> None:
    client = openai.OpenAI(base_url=f"{vsrv.url}/v1", api_key="unused")
    for name in ("a", "base"):
        whole = client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=48, temperature=0)
        ours = client.completions.create(model=f"builtin-{name}", prompt=PROMPTS[1], max_tokens=48, temperature=0)
        assert whole.choices[0].text == ours.choices[0].text
        pieces = [chunk.choices[0].text for chunk in client.completions.create(
            model=name, prompt=PROMPTS[1], max_tokens=48, temperature=0, stream=True) if chunk.choices]
        assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].text
    assert whole.usage.completion_tokens == 48 and whole.choices[0].finish_reason == "length"
    chat = [{"role": "user", "content": "你好"}]
    answer = client.chat.completions.create(model="a", messages=chat, max_tokens=32, temperature=0)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="a", messages=chat, max_tokens=32, temperature=0, stream=True) if chunk.choices)
    assert streamed == answer.choices[0].message.content
    assert vsrv.metric("gpt_service_generated_tokens", model="a") > 0


def test_refusals_come_before_vllm_sees_anything(vsrv: Server, vllm_workspace: dict) -> None:
    workspace = vllm_workspace["workspace"]
    pickled = workspace / "models" / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((workspace / vllm_workspace["a"] / "adapter_config.json").read_text())
    for body, code, words in [
        ({"lora_adapter": "../elsewhere"}, 403, "outside models/"),
        ({"lora_adapter": "models/pickled"}, 400, "safetensors"),
        ({"model_path": "models/other-base", "lora_adapter": vllm_workspace["a"]}, 400, "trained on"),
        ({"backend": "vllm", "vllm": {"max_model_len": 512}}, 409, "already runs with"),
        ({"backend": "builtin", "vllm": {"tensor_parallel_size": 2}}, 400, "vLLM backend only"),
        ({"backend": "tgi"}, 422, "backend"),
        ({"vllm": {"tensor_parallel_size": 0}}, 422, "tensor_parallel_size"),
    ]:
        answer = requests.post(f"{vsrv.url}/models/load", json={"model_name": "new", "model_path": "models/tiny",
                                                                 **body}, timeout=60)
        assert answer.status_code == code and words in answer.json()["detail"], (body, answer.text)
    long = requests.post(f"{vsrv.url}/generate", json={"model_name": "a", "prompt": "x", "max_tokens": 4096},
                         timeout=60)
    assert long.status_code == 400 and "context of 2048 tokens" in long.json()["detail"]
    assert "new" not in models(vsrv)


def test_a_burst_past_the_queue_answers_429(vsrv: Server) -> None:
    body = {"prompt": "x", "model_name": "base", "max_tokens": 300, "temperature": 1.0}
    with ThreadPoolExecutor(3 * (MAX_RUNNING + MAX_WAITING)) as pool:
        answers = list(pool.map(lambda _: requests.post(f"{vsrv.url}/generate", json=body, timeout=300),
                                range(3 * (MAX_RUNNING + MAX_WAITING))))
    codes = sorted(a.status_code for a in answers)
    assert 200 in codes and 429 in codes and set(codes) == {200, 429}, codes
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["Retry-After"] == "1" and "running or waiting" in refused.json()["detail"]
    assert models(vsrv)["base"]["running"] == 0  # every finished request left the count


def vllm_requests_done(server: Server) -> float:
    """Requests the vLLM server behind `server`'s models has finished, from vLLM's own /metrics."""
    port = models(server)["a"]["vllm"]["port"]
    families = text_string_to_metric_families(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
    return sum(sample.value for family in families if family.name == "vllm:request_success"
               for sample in family.samples if sample.name == "vllm:request_success_total")


def test_evaluate_answers_from_vllm(vsrv: Server) -> None:
    before = vllm_requests_done(vsrv)
    results = {name: requests.post(f"{vsrv.url}/evaluate", json={
        "model_name": name, "dataset_path": "data/a.jsonl", "compare_to_base": True, "max_tokens": 48,
        "num_examples": len(QA_PAIRS)}, timeout=600) for name in ("a", "builtin-a")}
    assert all(r.status_code == 200 for r in results.values()), [r.text for r in results.values()]
    ours, theirs = results["builtin-a"].json(), results["a"].json()
    assert vllm_requests_done(vsrv) - before == 2 * len(QA_PAIRS)  # the adapter's and the base's answers
    assert theirs["metrics"]["exact_match"] == 1.0 and theirs["examples"] == ours["examples"]
    assert theirs["metrics"] == pytest.approx(ours["metrics"]) and theirs["base_metrics"] == pytest.approx(
        ours["base_metrics"])


def test_a_killed_vllm_server_answers_503_until_reloaded(vsrv: Server, vllm_workspace: dict) -> None:
    pid = models(vsrv)["a"]["vllm"]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (health := requests.get(f"{vsrv.url}/health", timeout=10).json())["engines_alive"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert "exited with code -9" in health["vllm_failures"][0]
    answer = requests.post(f"{vsrv.url}/generate", json={"model_name": "a", "prompt": PROMPTS[0]}, timeout=60)
    assert answer.status_code == 503 and "replace: true" in answer.json()["detail"]
    openai_answer = requests.post(f"{vsrv.url}/v1/completions", json={"model": "b", "prompt": PROMPTS[0]}, timeout=60)
    assert openai_answer.status_code == 503 and "exited" in openai_answer.json()["error"]["message"]
    assert generate(vsrv, "builtin-a", PROMPTS[0])["text"] == QA_PAIRS[0][1]  # the builtin engine is untouched

    assert load(vsrv, "a", vllm_workspace["a"], replace=True).ok
    assert models(vsrv)["b"]["vllm"]["pid"] != pid and requests.get(f"{vsrv.url}/health").json()["engines_alive"]
    assert generate(vsrv, "a", PROMPTS[0])["text"] == QA_PAIRS[0][1]
    assert generate(vsrv, "b", PROMPTS[0])["text"] == OTHER_ANSWERS[0][1]  # its adapter came back too


def test_unloading_a_bases_last_model_stops_its_vllm_server(vsrv: Server) -> None:
    pid = models(vsrv)["a"]["vllm"]["pid"]
    for name in ("a", "b"):
        assert requests.post(f"{vsrv.url}/models/unload", json={"model_name": name}, timeout=60).ok
    assert Path(f"/proc/{pid}").exists()  # "base" still uses it
    assert requests.delete(f"{vsrv.url}/models/base", timeout=120).ok
    assert not Path(f"/proc/{pid}").exists()
    assert set(models(vsrv)) == {"builtin-base", "builtin-a", "builtin-b"}


def test_a_vllm_server_that_cannot_start_says_why(vsrv: Server, vllm_workspace: dict) -> None:
    broken = vllm_workspace["workspace"] / "models" / "unknown-architecture"
    build_demo_model(broken, num_heads=2)
    config = (broken / "config.json").read_text().replace("Qwen2ForCausalLM", "NoSuchModelForCausalLM")
    (broken / "config.json").write_text(config)
    answer = requests.post(f"{vsrv.url}/models/load", json={"model_name": "broken",
                                                            "model_path": "models/unknown-architecture"}, timeout=600)
    assert answer.status_code == 503, answer.text
    assert "NoSuchModelForCausalLM" in answer.json()["detail"] and "log" in answer.json()["detail"]
    assert "broken" not in models(vsrv) and requests.get(f"{vsrv.url}/health").json()["engines_alive"]


def test_without_vllm_a_load_names_the_set_up_command(workspace: Path, server_env: dict[str, str]) -> None:
    env = server_env | {"GPT_SERVICE_VLLM_PYTHON": str(workspace / "no-venv" / "bin" / "python")}
    server = Server(workspace, free_port(), env).start()
    try:
        answer = load(server, "tiny", backend="vllm")
        assert answer.status_code == 503 and "bash scripts/setup-vllm.sh" in answer.json()["detail"], answer.text
        assert load(server, "tiny").json()["backend"] == "builtin"  # the default backend, untouched
    finally:
        server.stop()
