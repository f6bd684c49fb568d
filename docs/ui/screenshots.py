"""Screenshots of the console (docs/ui/*.png, shown in the README) with some realistic state: three dozen tasks, a
few with several versions and training metadata, a training job run by a real worker, live load from a client
thread, and a streamed generation. Everything on a tiny random Llama and an embedded Redis, so the text it generates
is noise; the pages are what is shown.

    .venv/bin/python docs/ui/screenshots.py   # from the repository root; needs chromium and chromedriver (make tools)
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from prefix_store import BackboneFingerprint, EmbeddedRedis, encode  # noqa: E402
from tests.factories import make_artifact  # noqa: E402
from tests.service.browser import ADMIN_KEY, chromium, console_server, tiny_llm_dir  # noqa: E402
from tests.trainer.test_worker import DATA, start_worker, stop  # noqa: E402

OUT = Path(__file__).resolve().parent
TASKS = [
    f"{team}-{what}"
    for team in ("support", "search", "legal", "retail")
    for what in ("intent-en", "intent-de", "summary", "tone", "faq-answer", "routing", "title", "tags", "reply")
]
METHODS = ["prefix_tuning", "p_tuning_v2", "prompt_tuning"]


def seed_tasks(client: httpx.Client, fp: BackboneFingerprint) -> None:
    rng = random.Random(0)
    for i, name in enumerate(TASKS):
        for version in range(1, 1 + (3 if i % 7 == 0 else 1)):
            training = {
                "dataset": f"/data/{name}/train.jsonl",
                "steps": rng.choice([400, 800, 1200]),
                "metrics": {"bleu": round(rng.uniform(18, 34), 2), "rougeL": round(rng.uniform(0.3, 0.55), 3)},
            }
            art = make_artifact(name, METHODS[i % 3], P=rng.choice([8, 16, 20]), fp=fp, seed=version, training=training)
            r = client.put(f"/v1/tasks/{name}", files={"artifact": ("a.safetensors", encode(art))})
            r.raise_for_status()


def load(url: str, stop_at: float, seed: int) -> None:
    """Streams of generations on a few tasks, so the load page has something to plot."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as c:
        rng = random.Random(seed)
        while time.monotonic() < stop_at:
            task = rng.choice(TASKS[:6])
            c.post("/v1/generate", json={"task": task, "prompt": "w5 w6 w7", "max_new_tokens": rng.randint(4, 24)})


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ps-shots-"))
    redis = EmbeddedRedis(tmp / "redis")
    redis_url = redis.start()
    model_dir = tiny_llm_dir(tmp / "model")
    ns = "screenshots"
    worker = start_worker(model_dir, redis_url, ns, tmp / "work", "trainer-1", tmp / "worker.log")
    driver = chromium(1280, 1000)
    try:
        with console_server(model_dir, redis_url, ns) as (url, _):
            headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
            with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
                seed_tasks(client, fingerprint(json.loads((model_dir / "config.json").read_text())))
            driver.get(url + "/ui")
            _type(driver, "login-key", ADMIN_KEY)
            driver.find_element("css selector", "#login-form button[type=submit]").click()
            _until(driver, lambda d: "of 36" in d.find_element("id", "task-page").text)
            driver.save_screenshot(str(OUT / "tasks.png"))

            driver.find_element("xpath", f"//button[normalize-space()='{TASKS[0]}']").click()
            _until(driver, lambda d: "v3 (current)" in d.find_element("id", "version-table").text)
            driver.save_screenshot(str(OUT / "task.png"))

            driver.find_element("xpath", "//nav//button[normalize-space()='Training']").click()
            _type(driver, "tr-task", "support-reply-v2")
            driver.find_element("id", "tr-examples").send_keys("\n".join(json.dumps(x) for x in DATA))
            for field, value in (("tr-steps", "60"), ("tr-batch", "8"), ("tr-eval", "10"), ("tr-lr", "0.01")):
                _type(driver, field, value)
            driver.find_element("id", "tr-extra").send_keys('{"max_new_tokens": 4, "publish_degenerate": true}')
            driver.find_element("css selector", "#train-form button[type=submit]").click()
            _until(driver, lambda d: "published" in d.find_element("id", "jobs").text, timeout=300)
            driver.execute_script("document.querySelector('#jobs li').scrollIntoView()")
            driver.save_screenshot(str(OUT / "training.png"))

            stop_at = time.monotonic() + 20
            clients = [threading.Thread(target=load, args=(url, stop_at, i)) for i in range(3)]
            for t in clients:
                t.start()
            driver.find_element("xpath", "//nav//button[normalize-space()='Live load']").click()
            time.sleep(11)  # five reads of the load, the clients still sending
            driver.save_screenshot(str(OUT / "load.png"))
            for t in clients:
                t.join()

            driver.find_element("xpath", "//nav//button[normalize-space()='Playground']").click()
            _type(driver, "pl-task", TASKS[1])
            _type(driver, "pl-text", "w5 w6 w7 w8")
            _type(driver, "pl-max", "40")
            driver.find_element("css selector", "#play-form button[type=submit]").click()
            _until(driver, lambda d: "done:" in d.find_element("id", "pl-info").text)
            driver.save_screenshot(str(OUT / "playground.png"))
    finally:
        driver.quit()
        stop(worker)
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    sys.stdout.write(f"wrote {', '.join(sorted(p.name for p in OUT.glob('*.png')))} in {OUT}\n")


def fingerprint(config: dict) -> BackboneFingerprint:
    """The tiny Llama's fingerprint (what an artifact must match to be served on it)."""
    from transformers import LlamaConfig

    return BackboneFingerprint.from_config(LlamaConfig(**config))


def _type(driver, element_id: str, value: str) -> None:
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(value)


def _until(driver, condition, timeout: float = 60) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


if __name__ == "__main__":
    main()
