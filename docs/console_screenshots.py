"""Take the screenshots of docs/console.md: a real server on a scratch workspace, driven in headless chromium.

    .venv/bin/python docs/console_screenshots.py [--out docs]

Needs Debian's chromium and chromium-driver (and a CJK font, e.g. fonts-wqy-microhei, for the
Chinese sample data to show). Builds the tiny demo model, trains it on eight question/answer pairs
with the API key on, then visits every page of the console and saves docs/console-*.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpt_service.demo_model import build_demo_model  # noqa: E402
from tests.conftest import QA_PAIRS, free_port, qa_prompt  # noqa: E402
from tests.console.browser import start_browser  # noqa: E402

KEY = "docs-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def wait(condition: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := condition():
                return value
        except Exception:  # not there yet
            pass
        time.sleep(0.2)
    raise TimeoutError(condition)


def shoot(driver: Any, path: Path, full: bool = True) -> None:
    """The page as a user sees it: the whole page (full), or the window as it is."""
    time.sleep(0.6)
    if full:
        height = driver.execute_script("return Math.ceil(document.querySelector('main').getBoundingClientRect().bottom"
                                       " + window.scrollY + 16)")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 1360, "height": max(560, min(height, 2400)), "deviceScaleFactor": 1, "mobile": False})
        time.sleep(0.4)
    driver.save_screenshot(str(path))
    if full:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    print("wrote", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    out = parser.parse_args().out
    scratch = Path(tempfile.mkdtemp(prefix="console-docs-"))
    ws = scratch / "ws"
    (ws / "data").mkdir(parents=True)
    build_demo_model(ws / "models" / "demo")
    (ws / "data" / "train.json").write_text(json.dumps(
        [{"text": qa_prompt(q) + a} for q, a in QA_PAIRS] * 4, ensure_ascii=False), encoding="utf-8")
    (ws / "data" / "qa.json").write_text(json.dumps(
        [{"prompt": qa_prompt(q), "completion": a} for q, a in QA_PAIRS], ensure_ascii=False), encoding="utf-8")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT_SERVICE_")} | {"GPT_SERVICE_API_KEY": KEY}
    server = subprocess.Popen([sys.executable, "-m", "gpt_service.cli", "serve", "--workspace", str(ws),
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    driver = None
    try:
        wait(lambda: requests.get(f"{url}/health", timeout=1).ok, 60)
        driver = start_browser(scratch / "profile")
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        find = driver.find_element
        driver.get(f"{url}/")
        wait(lambda: find(By.ID, "key-dialog").get_attribute("open") is not None)
        find(By.ID, "api-key").send_keys(KEY)
        shoot(driver, out / "console-key.png", full=False)
        find(By.ID, "save-key").click()

        def train(**body: Any) -> str:
            body = {"base_model": "models/demo", "dataset_path": "data/train.json", "learning_rate": 5e-3,
                    "lora_config": {"target_modules": "all-linear"}, **body}
            return requests.post(f"{url}/train", json=body, headers=AUTH, timeout=30).json()["task_id"]

        def status(task_id: str) -> dict[str, Any]:
            return requests.get(f"{url}/train/status/{task_id}", headers=AUTH, timeout=10).json()

        # a finished training: its page with both curves
        done = train(output_dir="models/checkpoints/qa", num_epochs=30, eval_steps=8)
        driver.get(f"{url}/#/tasks/{done}")
        wait(lambda: status(done)["status"] == "completed", 600)
        wait(lambda: find(By.CSS_SELECTOR, "h1 .badge.completed"))
        shoot(driver, out / "console-task.png")

        # the list, with one running, one waiting behind it, one done
        running = train(output_dir="models/checkpoints/long", num_epochs=400, eval_steps=20)
        waiting = train(output_dir="models/checkpoints/next", num_epochs=3, dataset_path="data/qa.json")
        wait(lambda: status(running)["progress"] > 3, 300)
        driver.get(f"{url}/#/tasks")
        wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "tr.task-row")) == 3)
        shoot(driver, out / "console-tasks.png")
        driver.get(f"{url}/#/tasks/{running}")
        wait(lambda: int(find(By.ID, "loss-chart").get_attribute("data-loss-points") or 0) > 20)
        shoot(driver, out / "console-task-running.png")
        for task_id in (waiting, running):
            requests.post(f"{url}/train/{task_id}/cancel", headers=AUTH, timeout=10)

        # the training form
        driver.get(f"{url}/#/train")
        Select(wait(lambda: find(By.ID, "dataset"))).select_by_value("data/train.json")
        form = find(By.ID, "train-form")
        for name, value in {"num_epochs": "30", "learning_rate": "5e-3", "eval_steps": "8",
                            "lora.target_modules": "all-linear"}.items():
            form.find_element(By.NAME, name).send_keys(value)
        shoot(driver, out / "console-train.png")

        # two models loaded on one base: the base alone, and with the adapter
        adapter = status(done)["adapter_path"]
        for name, extra in (("demo", {}), ("demo-qa", {"lora_adapter": adapter})):
            requests.post(f"{url}/models/load", headers=AUTH, timeout=120,
                          json={"model_name": name, "model_path": "models/demo", **extra}).raise_for_status()
        driver.get(f"{url}/#/models?base=models/demo&adapter=models/checkpoints/qa/lora_adapter&name=qa-v2")
        wait(lambda: find(By.CSS_SELECTOR, "#models-table tr[data-model='demo-qa']"))
        shoot(driver, out / "console-models.png")

        # the playground: both answer the same prompt, streamed side by side
        driver.get(f"{url}/#/playground?model=demo-qa&model=demo")
        driver.refresh()
        prompt = wait(lambda: find(By.ID, "prompt"))
        prompt.send_keys(qa_prompt("什么是LoRA"))
        box = find(By.ID, "max-tokens")
        box.clear()
        box.send_keys("40")
        find(By.ID, "generate").click()
        wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".meta[data-done='true']")) == 2)
        shoot(driver, out / "console-playground.png")

        # evaluation: the adapter against its base, and the loaded adapter on the training text
        driver.get(f"{url}/#/evaluate")
        Select(wait(lambda: find(By.ID, "eval-model"))).select_by_value("path:models/demo")
        Select(find(By.ID, "eval-adapter")).select_by_value("models/checkpoints/qa/lora_adapter")
        Select(find(By.ID, "eval-dataset")).select_by_value("data/qa.json")
        find(By.ID, "eval-compare").click()
        find(By.ID, "run-evaluation").click()
        wait(lambda: "Evaluated" in find(By.ID, "eval-notice").text, 300)
        Select(find(By.ID, "eval-model")).select_by_value("name:demo")
        find(By.ID, "eval-compare").click()
        find(By.ID, "run-evaluation").click()
        wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#eval-table thead th")) == 4, 300)
        driver.execute_script("window.scrollTo(0, 0)")
        shoot(driver, out / "console-evaluate.png")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
