"""The chat-template renderer's budget is the child's CPU time: a render starved of CPU by a busy host finishes, a
render that spins is stopped at its budget."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import pytest

from service.templates import TemplateFailed, TemplateRenderer
from tests.models import tiny_tokenizer

PLAIN = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
SPIN = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}" + PLAIN

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="CPU time is read from Linux /proc")


@pytest.fixture
def renderer():
    r = TemplateRenderer(tiny_tokenizer(), budget_s=1.0)
    yield r
    r.stop()


def _starve(pid: int, seconds: float) -> None:
    """Holds the child off the CPU for `seconds` (what a host with no free core does to it), then lets it go."""
    os.kill(pid, signal.SIGSTOP)

    def resume() -> None:
        with contextlib.suppress(ProcessLookupError):  # the renderer killed it meanwhile
            os.kill(pid, signal.SIGCONT)

    timer = threading.Timer(seconds, resume)
    timer.daemon = True
    timer.start()


async def test_a_render_starved_past_its_budget_of_wall_clock_still_renders(renderer):
    messages = [{"role": "user", "content": "w1"}]
    first = await renderer.render(PLAIN, messages, owner="the test")  # the child is up
    _starve(renderer._proc.pid, 2.5)  # 2.5x the budget, inside WALL_FACTOR x budget
    t0 = time.monotonic()
    assert await renderer.render(PLAIN, messages, owner="the test") == first
    assert time.monotonic() - t0 >= 2.0, "the negative control: the render really waited past its budget"
    assert renderer.killed == 0


async def test_a_render_starved_past_the_wall_clock_bound_is_stopped(renderer):
    messages = [{"role": "user", "content": "w1"}]
    await renderer.render(PLAIN, messages, owner="the test")
    _starve(renderer._proc.pid, 30.0)  # the stopped child is killed long before this
    t0 = time.monotonic()
    with pytest.raises(TemplateFailed, match="within its budget"):
        await renderer.render(PLAIN, messages, owner="the test")
    assert time.monotonic() - t0 < 4.0 + 2.0 and renderer.killed == 1


async def test_a_render_that_spins_is_stopped_at_its_budget_of_cpu(renderer, monkeypatch):
    monkeypatch.setattr("service.templates.WALL_FACTOR", 60.0)  # so only the CPU budget can stop it in time
    await renderer.render(PLAIN, [{"role": "user", "content": "w1"}], owner="the test")
    t0 = time.monotonic()
    with pytest.raises(TemplateFailed, match="within its budget of 1s of CPU"):
        await renderer.render(SPIN, [{"role": "user", "content": "w1"}], owner="the test")
    assert time.monotonic() - t0 < 20.0 and renderer.killed == 1, "1 s of CPU, even on a host shared 10 ways"
