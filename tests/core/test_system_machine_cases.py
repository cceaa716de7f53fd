"""Runs of the whole-system machine (``test_system_machine``) kept as fixed cases: each replays
the steps hypothesis found, with every invariant checked after each step, as hypothesis does."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import test_system_machine as machine

INVARIANTS = [f for _, f in inspect.getmembers(machine.SystemMachine)
              if getattr(f, "hypothesis_stateful_invariant", None)]


def replay(steps: list[tuple[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``steps``, checking every invariant after each (an invariant fails by raising)."""
    # Found by hypothesis' marker: had it changed, no invariant would run and nothing could fail.
    assert len(INVARIANTS) >= 5, [f.__name__ for f in INVARIANTS]
    monkeypatch.setattr(machine, "event", lambda *args: None)  # hypothesis records none here
    state = machine.SystemMachine()
    checked = 0
    try:
        for name, kwargs in [("", {}), *steps]:
            if name:
                getattr(state, name)(**kwargs)
            for check in INVARIANTS:
                check(state)
                checked += 1
    finally:
        state.teardown()
    assert checked == (len(steps) + 1) * len(INVARIANTS)  # every step was replayed and checked


def test_a_moved_token_outlives_its_senders_dead_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token moved with a reservation open, its sender's broker dies: the sender adopts and
    ends its lease, the dead broker's own lease of the token expires last; the receiver (alive,
    not yet using it) names it in its renewals, so the executor keeps it."""
    replay([
        ("reject_request_admitted_is_served_in_time",
         {"amount": 1, "others": [(1, 1), (1, 1)], "pick": 757, "weight": 1}),
        ("advance", {"seconds": 0.1}),
        ("fail_the_next_write", {}),
        ("move", {"pick": 592, "to": 108}),
        ("reject_request_admitted_is_served_in_time",
         {"amount": 6, "others": [(38, 8), (4, 7), (26, 4), (8, 3)], "pick": 18964, "weight": 1}),
        ("advance", {"seconds": 0.1}),
        ("fail_the_next_write", {}),
        ("malformed_report_changes_nothing", {"bad": "negative", "pick": 2021}),
        ("reject_request_admitted_is_served_in_time",
         {"amount": 2, "others": [], "pick": 679, "weight": 32}),
        ("close", {"pick": 17124}),
        ("give_back_to_parent", {"pick": 0}),
        ("advance", {"seconds": 0.1}),
        ("advance", {"seconds": 0.1}),
        ("advance", {"seconds": 0.1}),
        ("kill_broker", {"node": "a"}),
        ("work", {"pick": 158, "rounds": 7, "share": 0.05, "used": "none"}),
        ("work", {"pick": 39, "rounds": 10, "share": 0.5, "used": "none"}),
        ("advance", {"seconds": 0.5}),
        ("work", {"pick": 3818, "rounds": 8, "share": 0.17077372424353116, "used": "none"}),
        ("reject_request_admitted_is_served_in_time",
         {"amount": 9, "others": [(1, 1), (1, 1), (1, 1), (1, 1), (1, 1)], "pick": 0, "weight": 1}),
        ("advance", {"seconds": 3.0}),
    ], monkeypatch)


def test_a_moved_token_whose_dead_sender_held_its_only_lease_may_be_released(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token passed on by a process that then died: its lease expires, and the receiver,
    which never used the token, holds none; the executor releases it as an orphan (it hears
    of a move only at the first use). The model expects that."""
    replay([
        ("work", {"pick": 726870, "rounds": 11, "share": 0.11788721596142877, "used": "none"}),
        ("move", {"pick": 627747, "to": 1932}),
        ("kill_broker", {"node": "b"}),
        ("move", {"pick": 2554, "to": 357}),
        ("move", {"pick": 999999, "to": 93156}),
        ("move", {"pick": 440, "to": 64487}),
        ("broker_renewals_pause_past_its_trust", {"node": "b", "pick": 237}),
        ("move", {"pick": 2071, "to": 141701}),
        ("move", {"pick": 1910, "to": 206}),
        ("work", {"pick": 3244, "rounds": 12, "share": 0.35941277940415317, "used": "all"}),
        ("broker_renewals_pause_past_its_trust", {"node": "a", "pick": 85}),
        ("move", {"pick": 0, "to": 4659}),
        ("work", {"pick": 14, "rounds": 2, "share": 0.27694847947932055, "used": "some"}),
        ("move", {"pick": 0, "to": 568}),
        ("kill", {"pick": 266}),
        ("move", {"pick": 1000, "to": 1880}),
        ("move", {"pick": 363, "to": 910}),
        ("work", {"pick": 21343, "rounds": 7, "share": 0.25852974476552787, "used": "all"}),
        ("kill_broker", {"node": "a"}),
        ("work", {"pick": 89886, "rounds": 3, "share": 0.10526251320419804, "used": "none"}),
        ("move", {"pick": 5422, "to": 1013}),
        ("work", {"pick": 14399, "rounds": 7, "share": 0.13976161731961043, "used": "some"}),
        ("move", {"pick": 1456, "to": 31838}),
        ("work", {"pick": 791, "rounds": 3, "share": 0.5413097864317545, "used": "none"}),
        ("work", {"pick": 424, "rounds": 12, "share": 0.1, "used": "none"}),
        ("work", {"pick": 495, "rounds": 2, "share": 0.3573347992572177, "used": "some"}),
        ("work", {"pick": 11151, "rounds": 3, "share": 0.28756248929342815, "used": "over"}),
        ("move", {"pick": 221, "to": 24}),
        ("move", {"pick": 2000, "to": 276268}),
        ("move", {"pick": 89, "to": 1011}),
        ("broker_renewals_pause_past_its_trust", {"node": "a", "pick": 123634}),
        ("move", {"pick": 231, "to": 0}),
        ("work", {"pick": 6021, "rounds": 2, "share": 0.33408131039500777, "used": "some"}),
        ("work", {"pick": 937061, "rounds": 11, "share": 0.46151719829514126, "used": "some"}),
    ], monkeypatch)
