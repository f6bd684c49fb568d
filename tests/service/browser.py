"""What the console's browser tests and its screenshot script (docs/ui/screenshots.py) share: Debian's headless
Chromium driven through chromium-driver (`make tools` installs both), and a service on a tiny random causal LM with
its admin key, optionally with a trainer worker."""

from __future__ import annotations

import copy
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peft import PrefixTuningConfig, get_peft_model

from service.app import create_app
from service.runtime import load_backbone
from service.settings import ServiceSettings
from tests.models import tiny_model, tiny_tokenizer
from tests.service.live import live_server

ADMIN_KEY = "console-admin-key"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver", "chromium-driver")


class NoBrowser(RuntimeError):
    """Chromium or its driver cannot be found or started here: the reason, for a skip."""


def chromium(width: int = 1280, height: int = 900):
    """A headless Chromium WebDriver. Raises NoBrowser naming what is missing or why it did not start."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        raise NoBrowser(f"selenium is not installed ({e}): pip install -e .[dev]") from None
    binary = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = next((p for p in map(shutil.which, DRIVERS) if p), None)
    if binary is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", binary), ("chromedriver", driver)) if p is None)
        raise NoBrowser(f"{missing} not found: `make tools` (as root) installs Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)  # --no-sandbox: root in a container has no user namespace for Chromium's sandbox
    options.add_argument(f"--window-size={width},{height}")
    try:
        return webdriver.Chrome(options=options, service=Service(executable_path=driver))
    except WebDriverException as e:
        raise NoBrowser(f"chromium did not start: {e.msg}") from None


def tiny_llm_dir(path: Path) -> Path:
    """A tiny random Llama with the suite's tiny tokenizer, saved as a backbone directory (what a worker loads)."""
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def peft_prefix_dir(path: Path, num_virtual_tokens: int = 4, seed: int = 1) -> Path:
    """A PEFT Prefix-Tuning adapter (adapter_config.json, adapter_model.safetensors) for the tiny Llama."""
    import torch

    pm = get_peft_model(
        copy.deepcopy(tiny_model("llama")),
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens),
    )
    torch.manual_seed(seed)
    for p in pm.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    pm.save_pretrained(path)
    return path


@contextmanager
def console_server(model_dir: Path, redis_url: str, namespace: str | None = None) -> Iterator[tuple[str, str]]:
    """The service on the tiny model with an admin key, in a thread: yields (base URL, namespace)."""
    ns = namespace or f"ui-{uuid.uuid4().hex[:8]}"
    settings = ServiceSettings(redis_url=redis_url, namespace=ns, admin_keys=[ADMIN_KEY])
    app = create_app(settings, backbone=load_backbone(str(model_dir), local_files_only=True))
    with live_server(app) as url:
        yield url, ns
