"""Test sessions on every Python ray_quota supports, each in a fresh virtualenv installed from
pyproject.toml as a new user would install it (``make test-pythons`` runs them all).

    nox -s core     # tests/core and the Ray-free root tests, on 3.11, 3.12 and 3.13
    nox -s full     # the type checker and the whole default suite (a Ray cluster), on 3.11
    nox -s core-3.13 -- -x -k fair   # one Python; arguments after -- go to pytest

Each Python must be on PATH as ``python3.X`` (with pyenv: ``PYENV_VERSION=3.11.7:3.12.1:3.13.0``).
"""

from __future__ import annotations

from pathlib import Path

import nox

PYTHONS = ["3.11", "3.12", "3.13"]
FULL_PYTHON = "3.11"
ROOT = Path(__file__).parent
PYTEST = ("python", "-m", "pytest", "-p", "no:cacheprovider")

nox.options.sessions = ["core", "full"]
nox.options.error_on_missing_interpreters = True  # a Python missing is a failure, not a skip


def core_tests() -> list[str]:
    """The pure core tests and the root tests, none of which starts Ray."""
    return ["tests/core", *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("tests/test_*.py"))]


@nox.session(python=PYTHONS)
def core(session: nox.Session) -> None:
    """The core suite: the scheduler, broker and executor service, metrics, dashboard, alerts."""
    session.install(".[dev]")
    session.run(*PYTEST, *core_tests(), *session.posargs)


@nox.session(python=FULL_PYTHON)
def full(session: nox.Session) -> None:
    """The README's test command: mypy, then every default test, Ray's included."""
    session.install(".[dev,bench]")
    session.run("python", "-m", "mypy")
    session.run(*PYTEST, *session.posargs)
