"""A token or reservation still open when the interpreter exits prints nothing: at exit Ray is down
and module globals may already be None (Python 3.13 printed two "Exception ignored in __del__"
tracebacks here). Without Ray: the handles are made bare, as a driver leaves them behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ray_quota import _token

ROOT = Path(__file__).resolve().parents[1]


def bare_handles() -> tuple[_token.QuotaToken, _token.Reservation]:
    token = _token.QuotaToken.__new__(_token.QuotaToken)
    token._state = _token._State.LIVE
    reservation = _token.Reservation.__new__(_token.Reservation)
    reservation._open = True
    reservation._token = token
    return token, reservation


def test_a_driver_exiting_with_open_handles_prints_nothing() -> None:
    script = textwrap.dedent("""
        from ray_quota import _token
        token = _token.QuotaToken.__new__(_token.QuotaToken)
        token._state = _token._State.LIVE
        reservation = _token.Reservation.__new__(_token.Reservation)
        reservation._open = True
        reservation._token = token
        print("exiting")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout == "exiting\n", done.stdout + done.stderr
    assert done.stderr == ""


def test_finalisers_survive_torn_down_module_globals(monkeypatch: pytest.MonkeyPatch) -> None:
    token, reservation = bare_handles()
    monkeypatch.setattr(_token, "ray", None)  # as module teardown leaves them
    monkeypatch.setattr(_token, "_State", None)
    token.__del__()
    reservation.__del__()


def test_finalisers_send_nothing_while_the_interpreter_finalizes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[object, ...]] = []
    monkeypatch.setattr(_token.routing, "send", lambda *args: sent.append(args))
    monkeypatch.setattr(_token.ray, "is_initialized", lambda: True)
    token, _ = bare_handles()
    monkeypatch.setattr(_token.QuotaToken, "_final_reports", lambda self: [])
    token._id, token._generation, token._claimant = "token-1", 0, "claimant-1"
    token.__del__(_finalizing=lambda: True)
    assert sent == []
    token.__del__(_finalizing=lambda: False)  # the same handle, not at exit: closed as usual
    assert [args[0] for args in sent] == ["close"]
