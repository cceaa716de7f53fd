"""Virtual time and the tokens it counts as active: the rule, exactly, on hand-made flows."""

from __future__ import annotations

import pytest

from ray_quota._core.fair_queue import Flow, Ticket, VirtualTime, Waiter


def waiting(token: Flow) -> Flow:
    token.waiters.append(Waiter(Ticket(1, "t", "k", 1), token, prefetch=0, deadline=9.0, seq=1))
    return token


def test_a_token_not_waiting_counts_until_its_credit_is_full() -> None:
    vt = VirtualTime(credit_factor=1.0)
    token = Flow(pass_=1.0, expected_use=2)  # granted 2 units at virtual time 0
    vt.place(token)
    vt.advance(2)  # alone: virtual time reaches its pass, its credit starts to fill
    assert (vt.now, vt.weight) == (1.0, 2)
    vt.advance(1)  # half way to a full credit
    assert (vt.now, vt.weight) == (1.5, 2)
    vt.advance(1)  # credit full: it stops counting; on, virtual time moves one unit a unit
    assert (vt.now, vt.weight) == (2.0, 0)
    vt.advance(3)
    assert vt.now == 5.0


def test_a_waiting_token_counts_however_far_behind() -> None:
    vt = VirtualTime(credit_factor=1.0)
    token = waiting(Flow(pass_=0.0, expected_use=4))
    vt.place(token)
    vt.advance(400)
    assert (vt.now, vt.weight) == (100.0, 4)


def test_crossing_a_horizon_mid_grant_changes_the_pace_for_the_rest() -> None:
    vt = VirtualTime(credit_factor=0.0)
    short, long = Flow(pass_=1.0, expected_use=1), Flow(pass_=3.0, expected_use=1)
    vt.place(short)
    vt.place(long)
    vt.advance(4)  # 2 units at weight 2 reach 1.0; short drops; 2 more at weight 1: 3.0
    assert vt.now == pytest.approx(3.0)
    assert vt.weight == 0


def test_a_closed_token_stops_counting_at_once() -> None:
    vt = VirtualTime(credit_factor=1.0)
    token = Flow(pass_=1.0, expected_use=3)
    vt.place(token)
    assert vt.weight == 3
    vt.place(token, closed=True)  # a one-shot token, served and closed: its successor counts
    assert vt.weight == 0
    vt.step_back(5)  # never revived
    assert vt.weight == 0


def test_stepping_back_revives_the_tokens_whose_horizon_it_goes_back_below() -> None:
    vt = VirtualTime(credit_factor=0.0)
    token = Flow(pass_=1.0, expected_use=1)
    vt.place(token)
    vt.advance(3)  # 1 at weight 1 to its pass, then 2 alone at pace 1
    assert (vt.now, vt.weight) == (3.0, 0)
    vt.step_back(3)  # 2 back to its pass at pace 1, then 1 at its weight
    assert (vt.now, vt.weight) == (0.0, 1)


def test_stale_entries_are_swept() -> None:
    vt = VirtualTime(credit_factor=1.0)
    token = Flow(pass_=0.0, expected_use=1)
    for i in range(1000):
        token.pass_ = float(i % 3)  # its pass moves (reports, refunds): placed again each time
        vt.place(token)
    assert vt.entries <= 2 + 64 + 2
