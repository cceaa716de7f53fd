"""Packed executor calls and queued give-backs (issue 15), on the executor class and the
process-side queue themselves (no Ray)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_MANIFEST

from ray_quota import Policy
from ray_quota._actors.executor import ExecutorActor
from ray_quota._core.protocol import ExecutorInfo, TokenInfo
from ray_quota._errors import ForgedTokenError, ProtocolError, TokenClosedError
from ray_quota._runtime import giveback, identity, routing, rpc
from ray_quota._runtime.packed import MAX_CARRIED, pack, unpack_answer, unpack_call


def executor(path: Path) -> ExecutorActor:
    return ExecutorActor(TEST_MANIFEST, "test", Policy(lease_ttl_s=10.0), state_path=str(path))


async def packed(actor: ExecutorActor, method: str, *args: Any) -> Any:
    return unpack_answer(await actor.call(pack(method, args)))


def test_a_packed_call_answers_as_the_method_does(tmp_path: Path) -> None:
    async def run() -> None:
        actor = executor(tmp_path / "state.sqlite")
        assert isinstance(await packed(actor, "info"), ExecutorInfo)
        opened = await packed(actor, "open_token", "tok", 10, "a", None)
        assert isinstance(opened, TokenInfo)
        assert await packed(actor, "describe", opened.id, 0, "a") == (10, 0.0)

    asyncio.run(run())


@pytest.mark.parametrize(("payload", "words"), [
    (pack("_recover", (None,)), "no call '_recover'"),
    (pack("call", (b"",)), "no call 'call'"),
    (pack("describe", ("x",)), "bad arguments to the executor's describe"),
    (b"not a pickle", "not a packed executor call"),
], ids=["private method", "call itself", "wrong arguments", "not a pickle"])
def test_a_bad_packed_call_is_answered_with_a_protocol_error(tmp_path: Path, payload: bytes,
                                                             words: str) -> None:
    async def run() -> Any:
        return unpack_answer(await executor(tmp_path / "state.sqlite").call(payload))

    answer = asyncio.run(run())
    assert isinstance(answer, ProtocolError) and words in str(answer)


def test_give_back_applies_its_calls_in_order_and_answers_each(tmp_path: Path) -> None:
    async def run() -> None:
        actor = executor(tmp_path / "state.sqlite")
        parent = await actor.open_token("tok", 100, "a", None)
        assert isinstance(parent, TokenInfo)
        child, left = await actor.split(parent.id, 0, "a", 30)
        assert left == 70
        answers = await actor.give_back([
            ("merge_back", (child.id, 0, "a", parent.id, [], None)),
            ("close", ("no-such-token", 0, "a", [], None)),  # refused; the rest still applies
        ])
        assert answers[0] is True
        assert isinstance(answers[1], ForgedTokenError)
        assert await actor.describe(parent.id, 0, "a") == (100, 0.0)
        assert await actor.give_back([("close", (parent.id, 0, "a", [], None))]) == [None]
        assert isinstance(await actor.describe(parent.id, 0, "a"), TokenClosedError)

    asyncio.run(run())


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[Any, ...]]]:
    """What the give-back queue sends, with Ray and the executor faked; the sender thread
    waits long enough that only the test flushes."""
    calls: list[tuple[str, tuple[Any, ...]]] = []
    monkeypatch.setattr(giveback.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(routing, "broker", lambda: None)
    monkeypatch.setattr(giveback.rpc, "send",
                        lambda method, *args, **_: calls.append((method, args)))
    monkeypatch.setattr(giveback, "BATCH_WINDOW_S", 60.0)
    giveback.flush()
    calls.clear()
    return calls


def queued(calls: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[str, tuple[Any, ...]]]:
    assert all(method == "give_back" for method, _ in calls)
    return [entry for _, (batch,) in calls for entry in batch]


def test_queued_give_backs_go_in_one_call_in_order_with_the_secret(
        sent: list[tuple[str, tuple[Any, ...]]]) -> None:
    giveback.queue("merge_back", "child", 1, "claim", "parent", [])
    giveback.queue("close", "other", 0, "claim", [])
    assert giveback.pending() == 2
    giveback.flush()
    assert sent == [("give_back", ([
        ("merge_back", ("child", 1, "claim", "parent", [], identity.SECRET)),
        ("close", ("other", 0, "claim", [], identity.SECRET))],))]
    assert giveback.pending() == 0


class FakeHandle:
    """An actor handle whose methods are never called here: the test stops at the step."""

    def __getattr__(self, name: str) -> Any:
        return name


@pytest.mark.parametrize("way", ["executor call", "lease call"])
def test_any_call_of_the_process_carries_the_queued_give_backs(
        sent: list[tuple[str, tuple[Any, ...]]], monkeypatch: pytest.MonkeyPatch,
        way: str) -> None:
    monkeypatch.setattr(rpc._Executor, "handle", FakeHandle())
    giveback.queue("close", "tok", 0, "claim", [])
    steps = rpc.calling("status") if way == "executor call" else routing.leasing("renew", "h")
    step = next(steps)  # the call's step, about to go out, with the give-back inside
    steps.close()
    assert unpack_call(step.args[0])[2] == [("close", ("tok", 0, "claim", [], identity.SECRET))]
    assert sent == [] and giveback.pending() == 0


def test_an_executor_call_applies_the_give_backs_it_carries_first(tmp_path: Path) -> None:
    async def run() -> None:
        actor = executor(tmp_path / "state.sqlite")
        parent = await actor.open_token("tok", 100, "a", None)
        child, _ = await actor.split(parent.id, 0, "a", 30)
        carried = [("merge_back", (child.id, 0, "a", parent.id, [], None))]
        answer = await actor.call(pack("describe", (parent.id, 0, "a"), carried))
        assert unpack_answer(answer) == (100, 0.0)

    asyncio.run(run())


def test_only_give_backs_may_be_queued(sent: list[tuple[str, tuple[Any, ...]]]) -> None:
    with pytest.raises(ValueError, match="'acquire'"):
        giveback.queue("acquire", "tok")
    assert giveback.pending() == 0


class _Shifty(str):
    """Compares as a give-back's name, and is looked up as another method (adversary 7, 09)."""

    def __eq__(self, other: object) -> bool:
        return other == "close" or str.__eq__(self, other)

    def __hash__(self) -> int:
        return hash("close")


@pytest.mark.parametrize("bad", [
    ("acquire", ()),  # not a give-back
    ("close",),  # no arguments
    7,
    (_Shifty("drain"), ()),
    ("close", ["not", "a", "tuple"]),
], ids=["not a give-back", "short", "not a pair", "str subclass", "list arguments"])
def test_a_give_back_batch_with_one_malformed_entry_is_refused_whole(tmp_path: Path,
                                                                     bad: Any) -> None:
    """Checked whole before any entry is applied: before, the entries ahead of a malformed
    one were applied in memory and never written, and the call raised."""
    async def run() -> None:
        actor = executor(tmp_path / "state.sqlite")
        parent = await actor.open_token("tok", 100, "a", None)
        batch = [("close", (parent.id, 0, "a", [], None)), bad]
        answers = await actor.give_back(batch)
        assert len(answers) == 1 and isinstance(answers[0], ProtocolError)
        carried = unpack_answer(await actor.call(pack("info", (), batch)))
        assert isinstance(carried, ProtocolError)
        assert await actor.describe(parent.id, 0, "a") == (100, 0.0)  # nothing applied

    asyncio.run(run())


def test_a_give_back_batch_over_the_bound_is_refused(tmp_path: Path) -> None:
    async def run() -> None:
        actor = executor(tmp_path / "state.sqlite")
        answers = await actor.give_back([("settle", ([], None))] * (MAX_CARRIED + 1))
        assert len(answers) == 1 and isinstance(answers[0], ProtocolError)

    asyncio.run(run())
