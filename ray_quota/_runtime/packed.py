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
    if not (isinstance(call, tuple) and len(call) == 3 and isinstance(call[0], str)
            and isinstance(call[1], tuple) and isinstance(call[2], list)):
        raise TypeError("a packed call is (method name, argument tuple, give-back list)")
    return call


def pack_answer(answer: Any) -> bytes:
    return pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)


def unpack_answer(packed: bytes) -> Any:
    return pickle.loads(packed)
