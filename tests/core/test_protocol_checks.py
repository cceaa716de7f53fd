"""The checks the executor runs on the messages it receives (ray_quota._core.protocol)."""

from __future__ import annotations

import math

import pytest

from ray_quota._core.protocol import (
    Adoption,
    Report,
    check_adoptions,
    check_generation,
    check_id,
    check_label,
    check_reports,
    check_timeout,
)
from ray_quota._errors import InvalidAmountError, ProtocolError
from ray_quota._spec import MAX_UNITS


def test_a_report_and_a_plain_tuple_become_a_report_of_their_fields() -> None:
    report = Report("t", "p:0", 1, 2, 3, True)
    assert Report.checked(report) == report and type(Report.checked(report)) is Report
    assert Report.checked(("t", "p:0", 1, 2, 3, False)) == Report("t", "p:0", 1, 2, 3, False)
    assert type(check_reports([("t", "p:0", 0, 0, 0, False)])[0]) is Report


@pytest.mark.parametrize("value, error, words", [
    (["t", "p:0", 0, 0, 0, False], ProtocolError, "report must be a Report"),
    (("t", "p:0", 0, 0, 0), ProtocolError, "report must be a Report"),
    ((b"t", "p:0", 0, 0, 0, False), ProtocolError, "report.token_id must be a str"),
    (("t", "p:0", 0, True, 0, False), InvalidAmountError, "report.used"),
    (("t", "p:0", 0, 0, MAX_UNITS + 1, False), InvalidAmountError, "report.debt"),
    (("t", "p:0", 0, 0, 0, "yes"), ProtocolError, "report.final must be a bool"),
])
def test_a_malformed_report_is_refused_naming_the_field(value: object, error: type[Exception],
                                                          words: str) -> None:
    with pytest.raises(error, match=words):
        Report.checked(value)


def test_adoptions_are_checked_field_by_field() -> None:
    entry = Adoption("t", "b:0", "p:0", 4, 0, 1, 0)
    assert check_adoptions((entry,)) == [entry]
    with pytest.raises(ProtocolError, match=r"entries\[0\].via"):
        check_adoptions([("t", None, "p:0", 4, 0, 1, 0)])
    with pytest.raises(InvalidAmountError, match=r"entries\[1\].returned"):
        check_adoptions([entry, ("t", "b:0", "p:1", 4, -2, 0, 0)])
    with pytest.raises(ProtocolError, match="entries must be a list"):
        check_adoptions(entry for entry in [entry])


@pytest.mark.parametrize("value", [None, 0, 0.0, 2, 1.5, 1e9])
def test_a_timeout_is_none_or_seconds_from_zero(value: float | None) -> None:
    assert check_timeout("timeout", value) == value


@pytest.mark.parametrize("value", [-1, -0.5, math.nan, math.inf, -math.inf, 10**400, True, "1",
                                   [1]])
def test_any_other_timeout_is_refused(value: object) -> None:
    with pytest.raises(InvalidAmountError, match="timeout"):
        check_timeout("timeout", value)


def test_ids_labels_and_generations_have_their_types() -> None:
    assert check_id("key", "p:0") == "p:0" and check_label(None) is None
    assert check_generation(3) == 3
    with pytest.raises(ProtocolError, match="key must be a str, not int"):
        check_id("key", 1)
    with pytest.raises(ProtocolError, match="label"):
        check_label(b"team")
    with pytest.raises(ProtocolError, match="generation"):
        check_generation(False)
