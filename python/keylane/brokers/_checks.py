"""Argument checks the adapters share: a consumer's group and topics, and
an adapter's ``config`` options (a frozen dataclass of keylane's own)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from keylane.errors import ConfigError

OptionsT = TypeVar("OptionsT")


def subscription(
    group: object, topics: Sequence[str], check_topic: Callable[[str], object], what: str
) -> tuple[str, ...]:
    """``topics`` checked one by one and without repeats, after ``group``."""
    if not isinstance(group, str) or not group:
        raise ConfigError(f"group must be a non-empty str, got {group!r}")
    if isinstance(topics, str) or not topics:
        raise ConfigError(f"topics must be a non-empty list of {what} names, got {topics!r}")
    for t in topics:
        check_topic(t)
    return tuple(dict.fromkeys(topics))


def options_of(cls: type[OptionsT], config: Mapping[str, Any] | None, adapter: str) -> OptionsT:
    """``cls(**config)``, refusing what is not a mapping or names an unknown
    option (the error lists the known ones)."""
    if config is None:
        return cls()
    if not isinstance(config, Mapping):
        raise ConfigError(f"config must be a mapping, not {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(f"unknown {adapter} option(s) {unknown}; known: {sorted(known)}")
    return cls(**config)


def number(options: object, name: str, low: float, high: float, *, whole: bool = False) -> None:
    """``options.name`` is a number (a whole one) in [low, high]."""
    v = getattr(options, name)
    ok = not isinstance(v, bool) and isinstance(v, int if whole else (int, float))
    if not ok or not low <= v <= high:
        kind = "a whole number" if whole else "a number"
        raise ConfigError(f"config[{name!r}] must be {kind} in [{low}, {high}], got {v!r}")
