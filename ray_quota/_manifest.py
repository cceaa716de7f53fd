"""Load and validate a quota manifest (YAML file or dict) into frozen `Environment` values.

Pydantic lives here and nowhere else: it checks the manifest, and this module hands the core plain
`ResourceSpec`s. Every problem, whether unreadable file, bad YAML or bad value, becomes one
`ManifestError` naming the source, the field path and the reason.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    model_validator,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ._errors import ManifestError
from ._spec import (
    MAX_NAME,
    MAX_UNITS,
    MIN_FLOOR,
    PERIOD_WORDS,
    Enforcement,
    Environment,
    FeedbackSpec,
    Kind,
    ResourceSpec,
)

__all__ = ["Manifest", "load_manifest", "parse_duration"]

_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME - 1}}}")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h|d)")
_DURATION_HELP = "use seconds or a string such as '500ms', '30s', '2m', '1h', '1d' or 'minute'"


def parse_duration(value: float | str) -> float:
    """Return seconds from a positive number of seconds, `"<n><ms|s|m|h|d>"` or a period word.

    Example:
        >>> parse_duration("1.5s"), parse_duration("2m"), parse_duration("hour"), parse_duration(5)
        (1.5, 120.0, 3600.0, 5.0)

    Raises:
        ValueError: the value is not a duration, or is not a finite number above zero.
    """
    seconds = _seconds(value)
    if seconds is None:
        raise ValueError(f"invalid duration {value!r}; {_DURATION_HELP}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"duration must be greater than zero and finite, got {value!r}")
    return seconds


def _seconds(value: object) -> float | None:
    if isinstance(value, bool):  # bool is an int, but `period: true` is a mistake, not one second
        return None
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:
            return math.inf  # refused by the caller as not finite
    if isinstance(value, str):
        text = value.strip().lower()
        if text in PERIOD_WORDS:
            return PERIOD_WORDS[text]
        if match := _DURATION.fullmatch(text):
            return float(match[1]) * _UNIT_SECONDS[match[2]]
    return None


def _wait_limit(value: float | str | None) -> float | None:
    """A wait limit in seconds: a duration, or zero for "do not wait at all" (reject at once)."""
    if value is None:
        return None
    if _seconds(value) == 0:
        return 0.0
    return parse_duration(value)


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid name {name!r}: use 1-{MAX_NAME} letters, digits, '.', '_' "
                         "or '-', "
                         "starting with a letter or digit")
    return name


# --- pydantic models: private, and translated to plain values before anyone else sees them ---

_Name = Annotated[StrictStr, AfterValidator(_check_name)]
# Strict: YAML `1.5`, `true` or `"10"` are typos, not amounts to round or coerce.
_Count = Annotated[int, Field(strict=True, gt=0, le=MAX_UNITS)]
_Duration = Annotated[float, BeforeValidator(parse_duration)]
_WaitLimit = Annotated[float | None, BeforeValidator(_wait_limit)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Rate(_Model):
    type: Literal["rate"]
    value: _Count
    period: _Duration
    burst: _Count | None = None  # None: as much as one period's refill


class _Capacity(_Model):
    type: Literal["capacity"]
    value: _Count


class _Concurrency(_Model):
    type: Literal["concurrency"]
    value: _Count


_DEFAULTS = FeedbackSpec()
_Fraction = Annotated[float, Field(strict=False, gt=0, lt=1, allow_inf_nan=False)]
_Share = Annotated[float, Field(strict=False, gt=0, le=1, allow_inf_nan=False)]


class _Feedback(_Model):
    """How the effective limit learns from the provider (see :class:`FeedbackSpec`)."""

    decrease: _Fraction = _DEFAULTS.decrease
    increase: _Share = _DEFAULTS.increase
    interval: _Duration | None = None  # None: the rate's period
    floor: Annotated[float, Field(strict=False, ge=MIN_FLOOR, le=1,
                                  allow_inf_nan=False)] = _DEFAULTS.floor
    margin: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = _DEFAULTS.margin


class _Resource(_Model):
    limit: Annotated[_Rate | _Capacity | _Concurrency, Field(discriminator="type")]
    enforcement: Literal["reject", "throttle", "terminate"] = "throttle"
    unit: Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME)] = "unit"
    wait_limit: _WaitLimit = None
    max_overuse: _Count | None = None  # None: the burst for rate, the limit otherwise
    feedback: _Feedback | None = None  # None: the defaults

    @model_validator(mode="after")
    def _feedback_on_rates(self) -> _Resource:
        if self.feedback is not None and not isinstance(self.limit, _Rate):
            raise ValueError("feedback applies to rate limits only (a provider's refusals "
                             "lower a rate)")
        return self


class _Manifest(_Model):
    environments: Annotated[
        dict[_Name, Annotated[dict[_Name, _Resource], Field(min_length=1)]], Field(min_length=1)
    ]


# --- the public value ---


@dataclass(frozen=True, slots=True)
class Manifest:
    """Validated environments, each a set of frozen `ResourceSpec`s.

    Example:
        >>> m = load_manifest({"environments": {"local": {
        ...     "conn": {"limit": {"type": "concurrency", "value": 8}}}}})
        >>> m.environment("local").resources["conn"].value
        8
    """

    environments: dict[str, Environment]
    source: str = field(default="<dict>", compare=False)  # for error messages only

    def environment(self, name: str) -> Environment:
        """Return the environment `name`; raise `ManifestError` listing the known ones if none."""
        try:
            return self.environments[name]
        except KeyError:
            known = ", ".join(sorted(self.environments)) or "none"
            raise ManifestError(f"{self.source}: environments.{name}: unknown environment; "
                                f"known: {known}") from None

    def with_environment(self, name: str, resources: Mapping[str, ResourceSpec]) -> Manifest:
        """A copy in which environment ``name`` holds ``resources`` (changed at run time)."""
        return Manifest({**self.environments, name: Environment(name, dict(resources))},
                        self.source)

    def to_dict(self) -> dict[str, Any]:
        """Return the manifest as plain dicts and scalars that `load_manifest` reads back equal.

        Example:
            >>> m = load_manifest({"environments": {"t": {
            ...     "b": {"limit": {"type": "capacity", "value": 9}}}}})
            >>> load_manifest(m.to_dict()) == m
            True
        """
        return {"environments": {
            env_name: {name: _spec_to_dict(spec) for name, spec in env.resources.items()}
            for env_name, env in self.environments.items()
        }}


def _spec_to_dict(spec: ResourceSpec) -> dict[str, Any]:
    limit: dict[str, Any] = {"type": spec.kind.value, "value": spec.value}
    if spec.kind is Kind.RATE:
        words = {seconds: word for word, seconds in PERIOD_WORDS.items()}
        limit["period"] = words.get(spec.period_s, spec.period_s)
        limit["burst"] = spec.burst
    out: dict[str, Any] = {"limit": limit, "enforcement": spec.enforcement.value, "unit": spec.unit}
    if spec.wait_limit_s is not None:
        out["wait_limit"] = spec.wait_limit_s
    if spec.max_overuse is not None:
        out["max_overuse"] = spec.max_overuse
    if spec.feedback != FeedbackSpec():
        fb = spec.feedback
        out["feedback"] = {"decrease": fb.decrease, "increase": fb.increase, "floor": fb.floor,
                           "margin": fb.margin}
        if fb.interval_s is not None:
            out["feedback"]["interval"] = fb.interval_s
    return out


def _to_spec(name: str, res: _Resource) -> ResourceSpec:
    limit = res.limit
    common: dict[str, Any] = {"enforcement": Enforcement(res.enforcement), "unit": res.unit,
                              "wait_limit_s": res.wait_limit, "max_overuse": res.max_overuse}
    if res.feedback is not None:
        fb = res.feedback
        common["feedback"] = FeedbackSpec(fb.decrease, fb.increase, fb.interval, fb.floor,
                                          fb.margin)
    if isinstance(limit, _Rate):
        burst = limit.value if limit.burst is None else limit.burst
        return ResourceSpec(name, Kind.RATE, limit.value, period_s=limit.period, burst=burst,
                            **common)
    return ResourceSpec(name, Kind(limit.type), limit.value, **common)


# --- loading ---


def load_manifest(source: str | os.PathLike[str] | Mapping[str, Any], *,
                  name: str | None = None) -> Manifest:
    """Load a manifest from a YAML file path or from a mapping of the same shape.

    Example:
        >>> m = load_manifest({"environments": {"local": {"llm-tokens": {
        ...     "limit": {"type": "rate", "value": 600, "period": "minute"}}}}})
        >>> m.environment("local").resources["llm-tokens"].burst
        600

    Args:
        source: a path (a `str` is always a path, never YAML text) or a mapping.
        name: what error messages call the source; default the path, or ``"<dict>"``.

    Raises:
        ManifestError: the file cannot be read, is not valid YAML, or the manifest is invalid.
    """
    lines: dict[tuple[str, ...], int] = {}
    if isinstance(source, Mapping):
        src = name or "<dict>"
        data: Any = dict(source)
    elif isinstance(source, (str, os.PathLike)):
        src = name or os.fspath(source)
        data, lines = _read_yaml(Path(source), src)
    else:
        raise TypeError(f"manifest source must be a path or a mapping, not {type(source).__name__}")
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ManifestError(f"{src}: top level: must be a mapping with an 'environments' key, "
                            f"got {got}")
    try:
        model = _Manifest.model_validate(data)
    except ValidationError as exc:
        raise _translate(exc, src, lines) from exc
    environments = {
        env_name: Environment(env_name, {n: _to_spec(n, r) for n, r in resources.items()})
        for env_name, resources in model.environments.items()
    }
    return Manifest(environments, source=src)


def _read_yaml(path: Path, src: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        hint = "; a str source is a path, not YAML text" if "\n" in str(path) else ""
        raise ManifestError(f"{src}: cannot read manifest: {reason}{hint}") from exc
    loader = _Loader(text, src)
    try:
        return loader.get_single_data(), loader.lines
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{src}:{mark.line + 1}" if mark is not None else src
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        raise ManifestError(f"{where}: YAML syntax error: {problem}"
                            + (f" ({context})" if context else "")) from exc
    finally:
        loader.dispose()


class _Loader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys, reads every key as a string, and notes key lines.

    Plain PyYAML keeps the last of two equal keys without a word, and reads `on:` or `1:` as a bool
    or an int; in a manifest both hide mistakes.
    """

    _STR = "tag:yaml.org,2002:str"
    _MERGE = "tag:yaml.org,2002:merge"

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self.source = source
        self.lines: dict[tuple[str, ...], int] = {}  # key path -> line, to point errors at the file
        self._seen: set[int] = set()

    def construct_document(self, node: Node) -> Any:
        self._walk(node, ())
        return super().construct_document(node)

    def _walk(self, node: Node, path: tuple[str, ...]) -> None:
        if id(node) in self._seen:  # aliases share nodes, and may even form cycles
            return
        self._seen.add(id(node))
        if isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, (*path, str(i)))
        elif isinstance(node, MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, ScalarNode) or key_node.tag == self._MERGE:
                    self._walk(value_node, path)
                    continue
                key_node.tag = self._STR
                key, line = key_node.value, key_node.start_mark.line + 1
                if key in first:
                    raise ManifestError(f"{self.source}:{line}: {_dotted((*path, key))}: duplicate "
                                        f"key (first defined on line {first[key]})")
                first[key] = line
                self.lines.setdefault((*path, key), line)
                self._walk(value_node, (*path, key))


# --- pydantic errors to one ManifestError ---

_MAPPING_TYPES = {"dict_type", "model_type", "model_attributes_type"}
_NO_GOT = {"missing", "extra_forbidden", "value_error", "too_short", "union_tag_invalid",
           "union_tag_not_found"}


def _translate(exc: ValidationError, src: str,
               lines: Mapping[tuple[str, ...], int]) -> ManifestError:
    problems = []
    for err in exc.errors(include_url=False):
        loc = _clean_loc(err["loc"], err["type"])
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        where = src if line is None else f"{src}:{line}"
        problems.append(f"{where}: {_dotted(loc)}: {_reason(err, loc)}")
    if len(problems) == 1:
        return ManifestError(problems[0])
    return ManifestError(f"{src}: {len(problems)} problems in manifest:\n"
                         + "\n".join(f"  {p}" for p in problems))


def _clean_loc(loc: tuple[int | str, ...], err_type: str) -> tuple[str, ...]:
    parts = [str(p) for p in loc if p != "[key]"]
    # environments.<env>.<resource>.limit.<tag>.<field>: the tag is pydantic's, not the user's
    if len(parts) > 4 and parts[0] == "environments" and parts[3] == "limit":
        del parts[4]
    if err_type.startswith("union_tag_"):
        parts.append("type")
    return tuple(parts)


def _dotted(loc: tuple[str, ...]) -> str:
    return ".".join(loc) or "top level"


def _reason(err: Any, loc: tuple[str, ...]) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "missing":
        reason = "required field is missing"
    elif kind == "extra_forbidden":
        reason = "unknown field"
    elif kind == "too_short":
        reason = ("declare at least one environment" if len(loc) == 1
                  else "an environment must declare at least one resource")
    elif kind == "union_tag_invalid":
        reason = f"unknown limit type {ctx['tag']!r}; expected rate, capacity or concurrency"
    elif kind == "union_tag_not_found":
        reason = "limit type is missing; expected rate, capacity or concurrency"
    elif kind in _MAPPING_TYPES:
        reason = "must be a mapping"
    elif kind == "int_type":
        reason = "must be a positive whole number"
    elif kind == "greater_than":
        reason = f"must be greater than {ctx['gt']}"
    elif kind == "less_than_equal":
        reason = f"too large: must be at most {ctx['le']}"
    else:
        # pydantic's own words, in the same voice as ours ("must be ...")
        reason = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be", 1)
    if kind not in _NO_GOT:
        got = repr(err["input"])
        reason += f" (got {got if len(got) <= 60 else got[:57] + '...'})"
    return reason
