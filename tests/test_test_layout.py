"""The suite runs as one pytest session (the README's test command) in pytest's default import
mode, where two test modules with one basename cannot both be collected."""

from __future__ import annotations

from collections import Counter

from conftest import ROOT


def test_test_modules_have_unique_basenames() -> None:
    names = Counter(path.name for path in (ROOT / "tests").rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
