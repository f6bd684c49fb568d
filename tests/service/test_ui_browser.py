"""The console in a real browser (headless Chromium through chromium-driver and Selenium): log-in with a wrong key and
the right one, upload of a PEFT adapter from its files, rollback, a training job submitted from the form and watched
to its published version by a real trainer worker, the live load, and a streamed generation in the playground.

One server, worker and browser for the module (starting them is most of the time); each test drives its own task.
Skipped, saying why, where Chromium or its driver cannot be found or started (`make tools` installs them as root)."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.service.browser import ADMIN_KEY, NoBrowser, chromium, console_server, peft_prefix_dir, tiny_llm_dir
from tests.trainer.test_worker import DATA, start_worker, stop

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(300)]
WAIT_S = 30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llm_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def browser():
    try:
        driver = chromium()
    except NoBrowser as e:
        pytest.skip(str(e))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def console(model_dir, redis_server, tmp_path_factory, browser):
    """(base URL, browser) with a trainer worker on the same namespace; the browser starts logged out."""
    work = tmp_path_factory.mktemp("worker")
    ns = f"ui-{uuid.uuid4().hex[:8]}"
    worker = start_worker(model_dir, redis_server.url, ns, work / "work", "ui-w1", work / "w1.log")
    try:
        with console_server(model_dir, redis_server.url, ns) as (url, _):
            browser.get(url + "/ui")
            yield url, browser
    finally:
        stop(worker)


def _wait(driver, condition, timeout=WAIT_S, what="the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: condition(d), message=f"waiting for {what}"
    )


def _text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def _fill(driver, element_id: str, value: str) -> None:
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(value)


def _log_in(driver):
    if driver.find_element("id", "nav").is_displayed():
        return
    _fill(driver, "login-key", ADMIN_KEY)
    driver.find_element("css selector", "#login-form button[type=submit]").click()
    _wait(driver, lambda d: d.find_element("id", "view-tasks").is_displayed(), what="the task list")


def _nav(driver, label: str):
    driver.find_element("xpath", f"//nav//button[normalize-space()='{label}']").click()


def test_log_in_refuses_a_wrong_key_then_keeps_the_right_one_in_the_session(console):
    url, d = console
    _fill(d, "login-key", "not-the-key")
    d.find_element("css selector", "#login-form button[type=submit]").click()
    _wait(d, lambda d: "invalid bearer key" in _text(d, "login-error"), what="the server's refusal")
    assert not d.find_element("id", "nav").is_displayed()
    assert d.execute_script("return sessionStorage.length") == 0

    _log_in(d)
    assert d.execute_script("return sessionStorage.getItem('prefixserve.adminKey')") == ADMIN_KEY
    assert d.execute_script("return localStorage.length + document.cookie.length") == 0
    assert ADMIN_KEY not in d.current_url
    d.refresh()  # the key outlives a reload of the tab
    _wait(d, lambda d: d.find_element("id", "view-tasks").is_displayed(), what="the task list after a reload")


def test_upload_peft_files_then_roll_back(console, tmp_path):
    url, d = console
    _log_in(d)
    task = "ui-upload"
    for version, seed in ((1, 1), (2, 2)):
        _nav(d, "Tasks")  # the upload form is there; a finished upload opens the task's page
        adapter = peft_prefix_dir(tmp_path / f"adapter-{seed}", num_virtual_tokens=3 + seed, seed=seed)
        _fill(d, "up-task", task)
        files = "\n".join(str(adapter / n) for n in ("adapter_config.json", "adapter_model.safetensors"))
        d.find_element("id", "up-peft").send_keys(files)
        d.find_element("css selector", "#upload-form button[type=submit]").click()
        _wait(d, lambda d, v=version: f"Uploaded {task} version {v}" in _text(d, "status"), what="the upload")
        _wait(d, lambda d, v=version: f"v{v} (current)" in _text(d, "version-table"), what="the version table")
    rows = d.find_elements("css selector", "#version-table tbody tr")
    assert len(rows) == 2 and "p_tuning_v2" in rows[0].text and "4" in rows[0].text

    d.find_element("xpath", "//button[normalize-space()='Roll back to v1']").click()
    _wait(d, lambda d: f"Rolled {task} back to version 1" in _text(d, "status"), what="the rollback")
    _wait(d, lambda d: "v1 (current)" in _text(d, "version-table"), what="v1 current")

    d.find_element("id", "task-back").click()
    _fill(d, "task-q", "ui-up")
    d.find_element("css selector", "#task-search button[type=submit]").click()
    _wait(d, lambda d: "of 1" in _text(d, "task-page") and task in _text(d, "task-table"), what="the search")


def test_training_job_from_the_form_to_its_published_version(console):
    url, d = console
    _log_in(d)
    _nav(d, "Training")
    _fill(d, "tr-task", "ui-trained")
    _fill(d, "tr-method", "prefix_tuning")
    d.find_element("id", "tr-examples").send_keys("\n".join(json.dumps(x) for x in DATA))
    for field, value in (("tr-steps", "20"), ("tr-batch", "8"), ("tr-eval", "10"), ("tr-lr", "0.01"), ("tr-p", "4")):
        _fill(d, field, value)
    d.find_element("id", "tr-extra").send_keys('{"max_new_tokens": 4, "publish_degenerate": true}')
    d.find_element("css selector", "#train-form button[type=submit]").click()
    _wait(d, lambda d: "queued" in _text(d, "status"), what="the job to be queued")
    job = d.find_element("css selector", "#jobs li")
    _wait(d, lambda d: "published ui-trained version 1" in job.text, timeout=240, what="the published version")
    assert "succeeded; step 20 of 20" in job.text
    assert d.execute_script("return arguments[0].querySelector('progress').value", job) == 20
    assert job.find_elements("css selector", "svg polyline.line-0"), "the loss is plotted"
    assert not job.find_element("xpath", ".//button[normalize-space()='Cancel job']").is_enabled()
    d.find_element("id", "job-refresh").click()  # the listing of recent jobs (GET /v1/train) shows it too
    _wait(d, lambda d: "ui-trained" in _text(d, "job-table") and "succeeded" in _text(d, "job-table"), what="listing")


def test_playground_streams_a_generation_and_the_load_view_counts_it(console, tmp_path):
    url, d = console
    _log_in(d)
    _nav(d, "Tasks")
    task = "ui-play"
    adapter = peft_prefix_dir(tmp_path / "adapter", seed=3)
    _fill(d, "up-task", task)
    d.find_element("id", "up-peft").send_keys("\n".join(str(p) for p in sorted(adapter.glob("adapter_*"))))
    d.find_element("css selector", "#upload-form button[type=submit]").click()
    _wait(d, lambda d: f"Uploaded {task} version 1" in _text(d, "status"), what="the upload")

    _nav(d, "Playground")
    _fill(d, "pl-task", task)
    _fill(d, "pl-text", "w5 w6 w7")
    _fill(d, "pl-max", "6")
    # Count the output's changes as they happen: a streamed answer arrives in several pieces, not at once.
    d.execute_script(
        "window.pieces = 0; new MutationObserver(() => window.pieces++)"
        ".observe(document.getElementById('pl-out'), {childList: true, characterData: true, subtree: true});"
    )
    d.find_element("css selector", "#play-form button[type=submit]").click()
    _wait(d, lambda d: "done:" in _text(d, "pl-info"), what="the end of the stream")
    assert f"length, 6 tokens, task {task} version 1" in _text(d, "pl-info") and _text(d, "pl-out").strip()
    assert d.execute_script("return window.pieces") >= 3  # cleared, then at least two pieces

    _nav(d, "Live load")
    _wait(d, lambda d: task in _text(d, "load-table"), what="the task in the load table")
    assert "Queue" in _text(d, "load-facts") and d.find_elements("css selector", "#plot-queue polyline")
