"""Recall watches: the rule (one open watch per holder, recalls kept until the next watch) and
the actors' RecallBoard, which keeps asyncio futures in it. No Ray."""

from __future__ import annotations

import asyncio

from ray_quota._actors.recall_board import RecallBoard
from ray_quota._core.watches import Watches


def test_a_recall_answers_the_open_watch_once() -> None:
    watches: Watches[str] = Watches()
    assert watches.watch("p", "w1") == (None, None)
    assert watches.post("p", {"b", "a"}, 0.0) == ("w1", ["a", "b"])
    assert watches.post("p", {"c"}, 0.0) is None  # w1 was answered: kept for the next watch
    assert watches.watch("p", "w2") == (["c"], None)
    assert watches.post("p", {"d"}, 0.0) is None  # w2 was answered at once, never opened


def test_recalls_without_a_watch_add_up_for_the_next() -> None:
    watches: Watches[str] = Watches()
    assert watches.post("p", {"t1"}, 0.0) is None
    assert watches.post("p", {"t2", "t1"}, 0.0) is None
    assert watches.post("q", {"t3"}, 0.0) is None
    assert watches.watch("p", "w") == (["t1", "t2"], None)
    assert watches.watch("q", "w") == (["t3"], None)


def test_a_new_watch_replaces_the_holders_open_one() -> None:
    watches: Watches[str] = Watches()
    watches.watch("p", "w1")
    assert watches.watch("p", "w2") == (None, "w1")  # answer w1 with []
    assert watches.post("p", {"t"}, 0.0) == ("w2", ["t"])


def test_only_the_open_watch_closes() -> None:
    watches: Watches[str] = Watches()
    watches.watch("p", "w1")
    watches.watch("p", "w2")
    assert not watches.close("p", "w1")  # replaced already
    assert watches.close("p", "w2")
    assert not watches.close("p", "w2")
    assert watches.post("p", {"t"}, 0.0) is None  # no watch open


def test_a_watch_that_cannot_answer_counts_as_absent() -> None:
    done = {"w1"}
    watches: Watches[str] = Watches(is_open=lambda watch: watch not in done)
    watches.watch("p", "w1")
    assert watches.post("p", {"t"}, 0.0) is None  # kept, not lost in a dead watch
    watches.watch("p", "w2")  # answered at once with t
    watches.watch("p", "w1")
    assert watches.watch("p", "w3") == (None, None)  # nothing to answer in w1


async def test_the_recall_board_answers_a_waiting_holder() -> None:
    board = RecallBoard()
    waiting = asyncio.ensure_future(board.wait("p", timeout_s=5.0))
    await asyncio.sleep(0)
    board.post("p", {"t2", "t1"})
    assert await waiting == ["t1", "t2"]


async def test_the_recall_board_keeps_recalls_past_a_timeout_for_the_next_wait() -> None:
    board = RecallBoard()
    assert await board.wait("p", timeout_s=0.01) == []
    board.post("p", {"t"})
    assert await board.wait("p", timeout_s=5.0) == ["t"]


async def test_a_second_wait_answers_the_first_with_nothing() -> None:
    board = RecallBoard()
    first = asyncio.ensure_future(board.wait("p", timeout_s=5.0))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(board.wait("p", timeout_s=5.0))
    await asyncio.sleep(0)
    assert await first == []
    board.post("p", {"t"})
    assert await second == ["t"]

