"""The web console end to end in a real browser (Debian's chromium), with the API key on.

Open /, give the key, start a training of the tiny model from the form, watch its loss curve gain
points while it runs, load the adapter it made, stream an answer in the playground, unload it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Server, free_port, make_workspace, qa_prompt
from tests.console.browser import missing, start_browser

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(missing() is not None, reason=f"no browser: {missing()}")]

KEY = "console-s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def guarded(tmp_path: Path, tiny_model: Path, server_env: dict[str, str]) -> Iterator[Server]:
    server = Server(make_workspace(tmp_path / "ws", tiny_model), free_port(),
                    server_env | {"GPT_SERVICE_API_KEY": KEY}).start()
    yield server
    server.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    driver = start_browser(tmp_path / "profile")
    yield driver
    driver.quit()


def wait_until(condition: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # an element not there yet, or replaced while read
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what or condition}")
        time.sleep(0.1)


def js_errors(driver: Any) -> list[str]:
    """Script errors the page logged; failed requests (the 401 that asks for the key) are not errors."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE" and e["source"] == "javascript"]


def test_train_watch_load_and_stream_in_the_browser(guarded: Server, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    find = browser.find_element
    finds = browser.find_elements
    browser.get(f"{guarded.url}/")

    # the first call gets 401: the page asks for the key (again after a wrong one), then shows the task list
    def asked() -> bool:
        return find(By.ID, "key-dialog").get_attribute("open") is not None

    wait_until(asked, what="the key dialog")
    find(By.ID, "api-key").send_keys("wrong-key")
    find(By.ID, "save-key").click()
    wait_until(lambda: asked() and "refused" in find(By.ID, "key-reason").text, what="the key dialog again")
    find(By.ID, "api-key").send_keys(KEY)
    find(By.ID, "save-key").click()
    wait_until(lambda: find(By.ID, "tasks-count").text == "0 tasks", what="the task list")
    assert browser.execute_script("return localStorage.getItem('gpt-service-api-key')") == KEY

    # the workers page lists the server's built-in worker, alive
    find(By.CSS_SELECTOR, "#nav a[data-view=workers]").click()
    row = wait_until(lambda: find(By.CSS_SELECTOR, "#worker-table .worker-row"), what="the worker list")
    health = requests.get(f"{guarded.url}/health", timeout=10).json()
    assert row.get_attribute("data-worker") == health["worker"] and "alive" in row.text and "cpu" in row.text
    find(By.CSS_SELECTOR, "#nav a[data-view=tasks]").click()
    wait_until(lambda: find(By.ID, "tasks-count").text == "0 tasks", what="the task list again")

    # the training form lists the workspace's datasets and models
    find(By.ID, "new-training").click()
    dataset = wait_until(lambda: find(By.ID, "dataset"), what="the training form")
    assert [o.get_attribute("value") for o in Select(dataset).options] == ["data/train.json"]
    Select(dataset).select_by_value("data/train.json")
    Select(find(By.ID, "base-model")).select_by_value("models/tiny")
    form = find(By.ID, "train-form")
    for name, value in {"output_dir": "models/console-run", "num_epochs": "80", "learning_rate": "5e-3",
                        "eval_steps": "8", "save_steps": "1000", "lora.target_modules": "all-linear"}.items():
        form.find_element(By.NAME, name).send_keys(value)
    find(By.ID, "start-training").click()
    wait_until(lambda: "#/tasks/" in browser.current_url, what="the task page")
    task_id = browser.current_url.rsplit("/", 1)[1]
    config = requests.get(f"{guarded.url}/train/{task_id}/config", headers=AUTH, timeout=10).json()["config"]
    assert config["num_epochs"] == 80 and config["lora_config"]["target_modules"] == "all-linear"

    # the loss curve gains points while the training runs
    def points(series: str = "loss") -> int:
        return int(find(By.ID, "loss-chart").get_attribute(f"data-{series}-points") or 0)

    snapshot = """const badge = document.querySelector("h1 .badge[data-status]");
        const chart = document.getElementById("loss-chart");
        return [badge && badge.dataset.status, !document.getElementById("cancel-task").disabled,
                Number(chart.getAttribute("data-loss-points") || 0)];"""
    seen: list[int] = []
    deadline = time.monotonic() + 300
    while (state := browser.execute_script(snapshot))[0] != "completed":
        current, can_cancel, count = state
        assert current in (None, "pending", "running"), find(By.ID, "task-overview").text
        assert time.monotonic() < deadline, f"the training did not end: {seen}"
        if current == "running":
            assert can_cancel
            if count and (not seen or count != seen[-1]):
                seen.append(count)
        time.sleep(0.2)
    assert len(seen) >= 2 and seen == sorted(seen), f"the curve did not grow while running: {seen}"
    metrics = requests.get(f"{guarded.url}/train/{task_id}/metrics", headers=AUTH, timeout=10).json()
    wait_until(lambda: points() == len(metrics["loss"]) and points("eval-loss") == len(metrics["eval_loss"]) > 0,
               what="the final curves")
    assert len(finds(By.CSS_SELECTOR, "#loss-chart polyline")) == 2
    assert not find(By.ID, "cancel-task").is_enabled()
    assert "num_epochs" in find(By.ID, "params").text
    wait_until(lambda: find(By.ID, "log-tail").text.strip() not in ("", "(no log lines yet)"), what="the log tail")

    # load the adapter it made, under a name of our own
    wait_until(lambda: find(By.ID, "load-task-adapter").is_displayed(), what="the load link")
    find(By.ID, "load-task-adapter").click()
    name_box = wait_until(lambda: find(By.ID, "load-name"), what="the models page")
    assert Select(find(By.ID, "load-base")).first_selected_option.get_attribute("value") == "models/tiny"
    assert Select(find(By.ID, "load-adapter")).first_selected_option.get_attribute("value").endswith(
        "models/console-run/lora_adapter")
    name_box.clear()
    name_box.send_keys("console-tuned")
    find(By.ID, "load-model").click()
    wait_until(lambda: find(By.CSS_SELECTOR, "#models-table tr[data-model='console-tuned']"), 120, "the loaded model")

    # stream an answer from it in the playground
    find(By.ID, "try-model").click()
    prompt = wait_until(lambda: find(By.ID, "prompt"), what="the playground")
    checked = [c.get_attribute("value") for c in finds(By.CSS_SELECTOR, ".play-model") if c.is_selected()]
    assert checked == ["console-tuned"]
    prompt.send_keys(qa_prompt("你好"))
    max_tokens = find(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("24")
    find(By.ID, "generate").click()
    output = wait_until(lambda: find(By.CSS_SELECTOR, ".output[data-model='console-tuned']"), what="the answer box")
    wait_until(lambda: output.find_element(By.CSS_SELECTOR, ".meta").get_attribute("data-done") == "true", 120,
               "the end of the stream")
    answer = output.find_element(By.CSS_SELECTOR, ".answer").text
    pieces = int(output.find_element(By.CSS_SELECTOR, ".meta").get_attribute("data-pieces"))
    assert answer and pieces >= 2, (answer, pieces)
    expected = requests.post(f"{guarded.url}/generate", headers=AUTH, timeout=60, json={
        "model_name": "console-tuned", "prompt": qa_prompt("你好"), "max_tokens": 24}).json()["text"]
    assert answer == expected.strip()

    # unload it again
    browser.get(f"{guarded.url}/#/models")
    unload = wait_until(lambda: find(By.CSS_SELECTOR, "button.unload[data-name='console-tuned']"), what="unload")
    unload.click()
    wait_until(lambda: "No model is loaded" in find(By.ID, "models-table").text, what="the unload")
    assert requests.get(f"{guarded.url}/models", headers=AUTH, timeout=10).json() == {"models": []}
    assert js_errors(browser) == []
