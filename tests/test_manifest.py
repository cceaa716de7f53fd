"""The manifest: what loads, what it turns into, and how each kind of mistake is reported."""

from __future__ import annotations

import copy
import dataclasses
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from ray_quota._errors import ManifestError
from ray_quota._manifest import Manifest, load_manifest, parse_duration
from ray_quota._spec import Enforcement, Environment, Kind, ResourceSpec

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "quota.yaml"

DESIGN_YAML = """\
environments:
  local:
    llm-tokens:
      limit: {type: rate, value: 90000, period: minute, burst: 20000}
      enforcement: throttle
      unit: token
    llm-budget-usd-cents:
      limit: {type: capacity, value: 50000}
      enforcement: reject
    vector-db-connections:
      limit: {type: concurrency, value: 8}
      enforcement: throttle
      wait_limit: 30s
"""

DESIGN_EXPECTED = {
    "local": Environment("local", {
        "llm-tokens": ResourceSpec("llm-tokens", Kind.RATE, 90000, period_s=60.0, burst=20000,
                                   enforcement=Enforcement.THROTTLE, unit="token"),
        "llm-budget-usd-cents": ResourceSpec("llm-budget-usd-cents", Kind.CAPACITY, 50000,
                                             enforcement=Enforcement.REJECT),
        "vector-db-connections": ResourceSpec("vector-db-connections", Kind.CONCURRENCY, 8,
                                              wait_limit_s=30.0),
    }),
}


def write(tmp_path: Path, text: str, name: str = "quota.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --- happy paths ---


def test_design_example_as_yaml_file_gives_frozen_specs(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, DESIGN_YAML))
    assert manifest.environments == DESIGN_EXPECTED


def test_design_example_as_dict_equals_the_yaml_file(tmp_path: Path) -> None:
    from_dict = load_manifest(yaml.safe_load(DESIGN_YAML))
    assert from_dict.environments == DESIGN_EXPECTED
    assert from_dict == load_manifest(write(tmp_path, DESIGN_YAML))


def test_path_may_be_str_or_pathlike(tmp_path: Path) -> None:
    path = write(tmp_path, DESIGN_YAML)
    assert load_manifest(str(path)) == load_manifest(path)


def test_any_mapping_is_accepted() -> None:
    source = types.MappingProxyType(yaml.safe_load(DESIGN_YAML))
    assert load_manifest(source).environments == DESIGN_EXPECTED


def test_example_manifest_loads_with_local_and_test_environments() -> None:
    manifest = load_manifest(EXAMPLE)
    assert set(manifest.environments) == {"local", "test"}
    local = manifest.environment("local").resources
    assert local["llm-tokens"] == ResourceSpec("llm-tokens", Kind.RATE, 60000, period_s=60.0,
                                               burst=2000, unit="token")
    assert local["llm-requests"].kind is Kind.CONCURRENCY and local["llm-requests"].value == 8
    assert local["llm-budget-usd-cents"].enforcement is Enforcement.REJECT
    test = manifest.environment("test").resources
    assert test["tok"].refill_per_s == 1000.0 and test["tok"].burst == 200
    assert test["budget"].kind is Kind.CAPACITY and test["budget"].value == 10000
    assert test["conn"].wait_limit_s == 5.0


def test_defaults_burst_to_value_and_enforcement_to_throttle() -> None:
    manifest = load_manifest({"environments": {"e": {
        "r": {"limit": {"type": "rate", "value": 600, "period": "hour"}},
        "c": {"limit": {"type": "capacity", "value": 7}},
    }}})
    rate, cap = manifest.environment("e").resources.values()
    assert (rate.burst, rate.period_s, rate.enforcement, rate.unit, rate.wait_limit_s) == (
        600, 3600.0, Enforcement.THROTTLE, "unit", None)
    assert (cap.period_s, cap.burst, cap.ceiling) == (0.0, 0, 7)


@pytest.mark.parametrize(("period", "seconds"), [
    ("second", 1.0), ("minute", 60.0), ("hour", 3600.0), ("day", 86400.0),
    ("500ms", 0.5), ("1.5s", 1.5), ("2m", 120.0), (90, 90.0), (0.25, 0.25),
])
def test_rate_period_accepts_words_durations_and_seconds(period: Any, seconds: float) -> None:
    manifest = load_manifest({"environments": {"e": {
        "r": {"limit": {"type": "rate", "value": 10, "period": period}}}}})
    assert manifest.environment("e").resources["r"].period_s == seconds


def test_yaml_keys_that_look_like_bools_or_numbers_are_names(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        environments:
          on:
            2024: {limit: {type: capacity, value: 1}}
    """)
    assert load_manifest(path).environment("on").resources["2024"].name == "2024"


def test_yaml_anchors_may_share_an_environment(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        environments:
          local: &shared
            conn: {limit: {type: concurrency, value: 2}}
          staging: *shared
    """)
    manifest = load_manifest(path)
    assert manifest.environment("staging").resources == manifest.environment("local").resources


@pytest.mark.parametrize("source", [DESIGN_YAML, EXAMPLE.read_text(encoding="utf-8"), """\
environments:
  e:
    odd-period:
      limit: {type: rate, value: 3, period: 1.5s}
      enforcement: terminate
      unit: call
      wait_limit: 250ms
"""])
def test_to_dict_round_trips_through_load_and_yaml(tmp_path: Path, source: str) -> None:
    manifest = load_manifest(yaml.safe_load(source))
    plain = manifest.to_dict()
    assert load_manifest(plain) == manifest
    assert load_manifest(write(tmp_path, yaml.safe_dump(plain))) == manifest


def test_manifest_is_frozen() -> None:
    manifest = load_manifest(yaml.safe_load(DESIGN_YAML))
    with pytest.raises(dataclasses.FrozenInstanceError):
        manifest.environments = {}  # type: ignore[misc]


def test_unknown_environment_names_the_known_ones(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, DESIGN_YAML))
    with pytest.raises(ManifestError, match=r"quota\.yaml.*environments\.prod.*known: local"):
        manifest.environment("prod")


# --- parse_duration ---


@pytest.mark.parametrize(("value", "seconds"), [
    (1, 1.0), (2.5, 2.5), ("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0),
    ("1d", 86400.0), ("1.5s", 1.5), (".5s", 0.5), (" 10 s ", 10.0), ("second", 1.0),
    ("minute", 60.0), ("hour", 3600.0), ("day", 86400.0), ("Minute", 60.0),
])
def test_parse_duration_gives_seconds(value: Any, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(("value", "reason"), [
    (0, "greater than zero"), (-1, "greater than zero"), ("0s", "greater than zero"),
    ("-5s", "invalid duration"), ("5", "invalid duration"), ("5 minutes", "invalid duration"),
    ("fortnight", "invalid duration"), ("1e3s", "invalid duration"), ("", "invalid duration"),
    (True, "invalid duration"), (None, "invalid duration"), ([1], "invalid duration"),
    (float("inf"), "finite"), (float("nan"), "finite"), (10**400, "finite"),
])
def test_parse_duration_refuses_with_a_clear_value_error(value: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_duration(value)


# --- the catalogue of bad manifests ---

_DELETE = object()
TOK = "environments.local.tok"


def good() -> dict[str, Any]:
    return {"environments": {"local": {"tok": {
        "limit": {"type": "rate", "value": 100, "period": "second", "burst": 10},
        "enforcement": "throttle",
    }}}}


def changed(path: str, value: Any) -> dict[str, Any]:
    """`good()` with the dotted `path` set to `value` (or removed, for `_DELETE`)."""
    data = copy.deepcopy(good())
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return data


def renamed(old_path: str, new_key: Any) -> dict[str, Any]:
    data = copy.deepcopy(good())
    *parents, last = old_path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[new_key] = node.pop(last)
    return data


def capacity(**extra: Any) -> dict[str, Any]:
    return changed(f"{TOK}.limit", {"type": "capacity", "value": 5, **extra})


BAD_MANIFESTS = [
    # (id, manifest, field path that must be named, a word of the reason)
    ("zero-value", changed(f"{TOK}.limit.value", 0), f"{TOK}.limit.value", "greater than 0"),
    ("negative-value", changed(f"{TOK}.limit.value", -5), f"{TOK}.limit.value", "greater than 0"),
    ("float-value", changed(f"{TOK}.limit.value", 1.5), f"{TOK}.limit.value", "whole number"),
    ("bool-value", changed(f"{TOK}.limit.value", True), f"{TOK}.limit.value", "whole number"),
    ("string-value", changed(f"{TOK}.limit.value", "100"), f"{TOK}.limit.value", "whole number"),
    ("huge-value", changed(f"{TOK}.limit.value", 2**53 + 1), f"{TOK}.limit.value", "too large"),
    ("huge-capacity", capacity(value=10**30), f"{TOK}.limit.value", "too large"),
    ("missing-value", changed(f"{TOK}.limit.value", _DELETE), f"{TOK}.limit.value", "missing"),
    ("unknown-limit-type", changed(f"{TOK}.limit.type", "bucket"), f"{TOK}.limit.type",
     "unknown limit type"),
    ("missing-limit-type", changed(f"{TOK}.limit.type", _DELETE), f"{TOK}.limit.type",
     "missing"),
    ("limit-not-a-mapping", changed(f"{TOK}.limit", 100), f"{TOK}.limit", "mapping"),
    ("missing-limit", changed(f"{TOK}.limit", _DELETE), f"{TOK}.limit", "missing"),
    ("unknown-period-word", changed(f"{TOK}.limit.period", "fortnight"), f"{TOK}.limit.period",
     "invalid duration"),
    ("negative-period", changed(f"{TOK}.limit.period", -60), f"{TOK}.limit.period",
     "greater than zero"),
    ("zero-period", changed(f"{TOK}.limit.period", "0s"), f"{TOK}.limit.period",
     "greater than zero"),
    ("malformed-period", changed(f"{TOK}.limit.period", "1 minute"), f"{TOK}.limit.period",
     "invalid duration"),
    ("missing-period", changed(f"{TOK}.limit.period", _DELETE), f"{TOK}.limit.period",
     "missing"),
    ("zero-burst", changed(f"{TOK}.limit.burst", 0), f"{TOK}.limit.burst", "greater than 0"),
    ("float-burst", changed(f"{TOK}.limit.burst", 2.5), f"{TOK}.limit.burst", "whole number"),
    ("unknown-top-level-field", changed("version", 2), "version", "unknown field"),
    ("unknown-resource-field", changed(f"{TOK}.colour", "red"), f"{TOK}.colour",
     "unknown field"),
    ("unknown-limit-field", changed(f"{TOK}.limit.refill", 3), f"{TOK}.limit.refill",
     "unknown field"),
    ("rate-field-on-capacity", capacity(period="minute"), f"{TOK}.limit.period",
     "unknown field"),
    ("unknown-enforcement", changed(f"{TOK}.enforcement", "block"), f"{TOK}.enforcement",
     "'throttle'"),
    ("empty-unit", changed(f"{TOK}.unit", ""), f"{TOK}.unit", "at least 1 character"),
    ("bad-resource-name", renamed(TOK, "llm tokens"), "environments.local.llm tokens",
     "invalid name"),
    ("resource-name-starts-with-dash", renamed(TOK, "-tok"), "environments.local.-tok",
     "invalid name"),
    ("resource-name-too-long", renamed(TOK, "x" * 65), "environments.local." + "x" * 65,
     "invalid name"),
    ("bad-environment-name", renamed("environments.local", "prod/eu"), "environments.prod/eu",
     "invalid name"),
    ("empty-environment", changed("environments.local", {}), "environments.local",
     "at least one resource"),
    ("null-environment", changed("environments.local", None), "environments.local", "mapping"),
    ("no-environments", changed("environments", {}), "environments",
     "at least one environment"),
    ("missing-environments", changed("environments", _DELETE), "environments", "missing"),
    ("malformed-wait-limit", changed(f"{TOK}.wait_limit", "soon"), f"{TOK}.wait_limit",
     "invalid duration"),
    ("negative-wait-limit", changed(f"{TOK}.wait_limit", -1), f"{TOK}.wait_limit",
     "greater than zero"),
    ("zero-max-overuse", changed(f"{TOK}.max_overuse", 0), f"{TOK}.max_overuse",
     "greater than 0"),
    ("negative-max-overuse", changed(f"{TOK}.max_overuse", -3), f"{TOK}.max_overuse",
     "greater than 0"),
    ("float-max-overuse", changed(f"{TOK}.max_overuse", 2.5), f"{TOK}.max_overuse",
     "whole number"),
    ("string-max-overuse", changed(f"{TOK}.max_overuse", "10"), f"{TOK}.max_overuse",
     "whole number"),
    ("huge-max-overuse", changed(f"{TOK}.max_overuse", 2**53 + 1), f"{TOK}.max_overuse",
     "too large"),
]


@pytest.mark.parametrize("zero", [0, 0.0, "0s", "0ms"])
def test_a_zero_wait_limit_means_do_not_wait(zero: Any) -> None:
    """DESIGN 2: ``wait_limit: 0s`` is the natural way to write reject-at-once."""
    spec = load_manifest(changed(f"{TOK}.wait_limit", zero)).environment("local").resources
    assert spec["tok"].wait_limit_s == 0.0
    assert load_manifest(load_manifest(changed(f"{TOK}.wait_limit", zero)).to_dict()) \
        == load_manifest(changed(f"{TOK}.wait_limit", zero))


def test_max_overuse_defaults_to_the_burst_or_the_limit_and_can_be_declared() -> None:
    resources = load_manifest(changed(f"{TOK}.max_overuse", 7)).environment("local").resources
    assert resources["tok"].overuse_cap == 7
    assert load_manifest(load_manifest(changed(f"{TOK}.max_overuse", 7)).to_dict()) \
        == load_manifest(changed(f"{TOK}.max_overuse", 7))
    default = load_manifest(changed(f"{TOK}.wait_limit", 1)).environment("local").resources
    for spec in default.values():
        assert spec.max_overuse is None and spec.overuse_cap == spec.ceiling


@pytest.mark.parametrize("as_file", [False, True], ids=["dict", "file"])
@pytest.mark.parametrize(("manifest", "field_path", "reason"),
                         [case[1:] for case in BAD_MANIFESTS], ids=[c[0] for c in BAD_MANIFESTS])
def test_bad_manifest_names_source_field_and_reason(
    tmp_path: Path, as_file: bool, manifest: dict[str, Any], field_path: str, reason: str
) -> None:
    source: Any = write(tmp_path, yaml.safe_dump(manifest), "bad.yaml") if as_file else manifest
    with pytest.raises(ManifestError) as info:
        load_manifest(source)
    message = str(info.value)
    assert type(info.value) is ManifestError
    assert f": {field_path}: " in message
    assert reason in message
    assert str(tmp_path / "bad.yaml") in message if as_file else "<dict>" in message


BAD_YAML = [
    # (id, file text, substrings the message must contain besides the file name)
    ("duplicate-resource", """\
        environments:
          local:
            tok: {limit: {type: concurrency, value: 1}}
            tok: {limit: {type: concurrency, value: 2}}
     """, ["quota.yaml:4:", "environments.local.tok", "duplicate key", "line 3"]),
    ("duplicate-environment", """\
        environments:
          local:
            a: {limit: {type: concurrency, value: 1}}
          local:
            b: {limit: {type: concurrency, value: 1}}
     """, ["quota.yaml:4:", "environments.local", "duplicate key", "line 2"]),
    ("duplicate-field-in-flow-mapping", """\
        environments:
          local:
            tok: {limit: {type: capacity, value: 1, value: 2}}
     """, ["quota.yaml:3:", "environments.local.tok.limit.value", "duplicate key"]),
    ("syntax-error", """\
        environments:
          local:
            tok: {limit: {type: capacity, value: 1}
     """, ["quota.yaml:", "YAML syntax error"]),
    ("bad-indentation", """\
        environments:
          local:
            tok:
              limit: {type: capacity, value: 1}
             enforcement: reject
     """, ["quota.yaml:5:", "YAML syntax error"]),
    ("top-level-list", "- environments\n", ["top level", "mapping", "list"]),
    ("top-level-scalar", "environments\n", ["top level", "mapping", "str"]),
    ("empty-file", "", ["top level", "empty file"]),
    ("two-documents", "environments: {}\n---\nenvironments: {}\n", ["YAML syntax error",
                                                                    "single document"]),
    ("error-points-at-the-line", """\
        environments:
          local:
            tok:
              limit:
                type: rate
                value: 10
                period: minute
                burst: 0
     """, ["quota.yaml:8:", "environments.local.tok.limit.burst", "greater than 0"]),
]


@pytest.mark.parametrize(("text", "expected"), [case[1:] for case in BAD_YAML],
                         ids=[case[0] for case in BAD_YAML])
def test_bad_yaml_file_names_file_and_reason(tmp_path: Path, text: str,
                                             expected: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(ManifestError, match=r"nowhere\.yaml: cannot read manifest"):
        load_manifest(missing)


def test_directory_is_not_a_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_manifest(tmp_path)


def test_yaml_text_passed_as_a_path_gets_a_hint() -> None:
    with pytest.raises(ManifestError, match="path, not YAML text"):
        load_manifest(DESIGN_YAML)


def test_non_string_key_in_a_dict_is_refused() -> None:
    with pytest.raises(ManifestError, match=r"<dict>: environments\.3: .*string"):
        load_manifest({"environments": {3: good()["environments"]["local"]}})


def test_source_of_another_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="path or a mapping"):
        load_manifest(42)  # type: ignore[arg-type]


def test_name_overrides_the_source_in_messages(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"^team-quota: environments\.local: "):
        load_manifest(changed("environments.local", {}), name="team-quota")
    path = write(tmp_path, "environments: {local: {}}\n")
    with pytest.raises(ManifestError, match=r"^team-quota:1: environments\.local: "):
        load_manifest(path, name="team-quota")


def test_every_problem_is_listed_in_one_error(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        environments:
          local:
            tok: {limit: {type: rate, value: 0, period: fortnight, burst: 1.5}}
            bad name: {limit: {type: capacity, value: 1}}
            conn: {limit: {type: concurrency, value: 2}, colour: red}
    """)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    header, *problems = str(info.value).splitlines()
    assert header == f"{path}: 5 problems in manifest:"
    assert [p.split(": ")[1] for p in problems] == [
        "environments.local.tok.limit.value",
        "environments.local.tok.limit.period",
        "environments.local.tok.limit.burst",
        "environments.local.bad name",
        "environments.local.conn.colour",
    ]
    assert all(p.startswith(f"  {path}:") for p in problems)


def test_pydantic_error_is_only_the_cause_never_the_error() -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(changed(f"{TOK}.limit.value", 0))
    assert not isinstance(info.value, Manifest)
    assert type(info.value.__cause__).__module__.startswith("pydantic")
    assert "pydantic" not in type(info.value).__module__
