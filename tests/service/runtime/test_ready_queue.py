"""The ready queue on its own: priority classes first (high before normal before low, whatever arrived first), then
within a class round-robin over tasks and each task's clients, as before classes existed."""

from dataclasses import dataclass, field
from itertools import count

import pytest

from service.runtime.ready_queue import ReadyQueue
from service.runtime.step import Submission

_ids = count()


@dataclass(eq=False)
class Item:
    task: str | None
    client: str = ""
    priority: str = "normal"
    id: int = field(default_factory=lambda: next(_ids))

    def __repr__(self) -> str:
        return f"{self.priority[0]}:{self.task}/{self.client}#{self.id}"


def admit_all(q: ReadyQueue) -> list[Item]:
    """What the scheduler's admission loop takes when everything fits: class by class, its heads turn by turn."""
    out = []
    while q:
        for priority in q.priorities():
            while q.has(priority):
                for item in q.heads(priority):
                    q.pop(item, served=True)
                    out.append(item)
    return out


def test_high_is_admitted_ahead_of_earlier_queued_low_and_normal():
    q = ReadyQueue()
    low = [Item("a", "c1", "low") for _ in range(3)]
    normal = [Item("b", "c1") for _ in range(2)]
    high = [Item("a", "c2", "high"), Item("c", "c3", "high")]
    for item in low + normal + high:  # the high requests arrive last
        q.push(item)
    assert len(q) == 7 and q.priorities() == ["high", "normal", "low"]
    assert q.heads() == high  # the default: the highest class with requests
    order = admit_all(q)
    assert order == high + normal + low
    assert list(ReadyQueue().admission_order()) == []


def test_admission_order_and_iteration_go_class_by_class():
    q = ReadyQueue()
    items = [Item("a", priority="low"), Item("a"), Item("b", priority="high"), Item("a", priority="high")]
    for item in items:
        q.push(item)
    assert list(q.admission_order()) == [items[2], items[3], items[1], items[0]]
    assert set(q) == set(items)
    assert q.remove(items[2]) and not q.remove(items[2])
    assert q.heads("high") == [items[3]] and q.heads("low") == [items[0]]
    q.pop(items[3], served=False)
    assert q.priorities() == ["normal", "low"] and len(q) == 2


def test_fairness_within_a_class_is_unchanged():
    """In one class: one request per task per turn, and within a task one per client per turn, FIFO per client."""
    q = ReadyQueue()
    hot = [Item("hot", "c1") for _ in range(3)] + [Item("hot", "c2")]
    cold = [Item("cold", "c1")]
    for item in hot + cold:
        q.push(item)
    assert q.heads("normal") == [hot[0], cold[0]]
    assert list(q.admission_order()) == [hot[0], cold[0], hot[3], hot[1], hot[2]]
    assert admit_all(q) == [hot[0], cold[0], hot[3], hot[1], hot[2]]


def test_a_served_head_goes_to_the_back_of_its_own_class():
    q = ReadyQueue()
    a1, a2, b1 = Item("a", priority="low"), Item("a", priority="low"), Item("b", priority="low")
    h = Item("a", priority="high")
    for item in (a1, a2, b1, h):
        q.push(item)
    q.pop(a1, served=True)  # task a served in the low class: b goes first there next
    assert q.heads("low") == [b1, a2] and q.heads("high") == [h]


def test_submission_priority_is_checked():
    assert Submission([5], priority="high").priority == "high"
    with pytest.raises(ValueError, match="priority: expected one of high, normal, low, got 'urgent'"):
        Submission([5], priority="urgent")


def test_one_class_s_admission_order_and_members():
    q = ReadyQueue()
    items = [Item("a", priority="low"), Item("b", priority="high"), Item("a", priority="low"), Item("c", "x", "low")]
    for item in items:
        q.push(item)
    assert list(q.admission_order("low")) == [items[0], items[3], items[2]]
    assert list(q.admission_order("high")) == [items[1]] and list(q.admission_order("normal")) == []
    assert set(q.of("low")) == {items[0], items[2], items[3]} and list(q.of("normal")) == []
