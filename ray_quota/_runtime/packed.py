"""Executor calls as one argument and one answer of bytes, which Ray passes for almost nothing.

Ray serialises each argument of an actor call on its own and each answer that is not a plain
value through cloudpickle: measured on this 2-core machine (``python -m bench.exec_path
--pieces``), an acquire's eight arguments added about 1 ms to a 2 ms round trip and its
:class:`~ray_quota._core.protocol.Grant` answer about 0.4 ms, more than the executor's own work.
Packed into one ``bytes`` each way, a call costs what a call without arguments costs.

Pickle is no new trust: Ray unpickles every actor call's arguments and answers anyway.
"""

from __future__ import annotations

import pickle
from typing import Any

PACKED_METHOD = "call"  # the executor's method that takes a packed call
GIVE_BACKS = frozenset({"close", "merge_back", "settle"})  # what its ``give_back`` applies
BATCHED = "give_back.operations"  # in the executor's call counts: operations that came batched


Carried = list[tuple[str, tuple[Any, ...]]]  # give-backs, each (method, its arguments)
# The most give-backs one call may carry or batch: a client sends at most BATCH_MAX
# (giveback.py) at a time; more only holds the executor's loop up.
MAX_CARRIED = 1024


def check_carried(calls: object) -> Carried:
    """``calls`` if it is a list of at most :data:`MAX_CARRIED` (method, argument tuple)
    pairs naming give-backs, exact types all (a ``str`` subclass could compare as one name
    and look up as another); checked whole before any is applied.

    Raises:
        TypeError: naming what is wrong.
    """
    if type(calls) is not list:
        raise TypeError(f"give-backs come as a list, not {type(calls).__name__}")
    if len(calls) > MAX_CARRIED:
        raise TypeError(f"at most {MAX_CARRIED} give-backs at once, not {len(calls)}")
    for entry in calls:
        if not (type(entry) is tuple and len(entry) == 2 and type(entry[0]) is str
                and type(entry[1]) is tuple):
            raise TypeError("a give-back is (method name, argument tuple)")
        if entry[0] not in GIVE_BACKS:
            raise TypeError(f"{entry[0][:40]!r} is not a give-back")
    return calls


def pack(method: str, args: tuple[Any, ...], carried: Carried | None = None) -> bytes:
    """A call of ``method(*args)`` as bytes, with the queued give-backs ``carried`` (applied
    first: see :mod:`ray_quota._runtime.giveback`)."""
    return pickle.dumps((method, args, carried or []), protocol=pickle.HIGHEST_PROTOCOL)


def unpack_call(packed: bytes) -> tuple[str, tuple[Any, ...], Carried]:
    """The method name, arguments and carried give-backs that :func:`pack` packed.

    Raises:
        TypeError: ``packed`` is not a packed call.
    """
    if not isinstance(packed, bytes):
        raise TypeError(f"a packed call is bytes, not {type(packed).__name__}")
    call = pickle.loads(packed)
    if not (type(call) is tuple and len(call) == 3 and type(call[0]) is str
            and type(call[1]) is tuple):
        raise TypeError("a packed call is (method name, argument tuple, give-back list)")
    return call[0], call[1], check_carried(call[2])


def pack_answer(answer: Any) -> bytes:
    return pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)


def unpack_answer(packed: bytes) -> Any:
    return pickle.loads(packed)
