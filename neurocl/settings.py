"""Dotted command-line settings for a pipeline: ``--set training.lr=1e-3 --set method.lam_mi=50``.

Each value is read as a YAML scalar or flow collection (``1e-3`` is a number, as is any text
that Python's ``float`` reads, ``true`` a boolean,
``[age, sex]`` a list, ``null`` None), then merged into the pipeline's YAML before the schema
validates the result, so a setting is checked exactly like the same line in the file. Values are
read by the one YAML reader (:func:`neurocl.io.parse_yaml`: a flow mapping that repeats a key is
refused), and a field set twice is refused rather than the last setting winning unseen.
"""

from __future__ import annotations

from typing import Any, Sequence

from neurocl.errors import ConfigError
from neurocl.io import parse_yaml


def parse_settings(settings: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "a.c=x"]`` -> ``{"a": {"b": 1, "c": "x"}}``; a malformed setting raises ConfigError."""
    nested: dict[str, Any] = {}
    given: dict[str, str] = {}
    for setting in settings:
        key, equals, text = setting.partition("=")
        path = key.strip().split(".")
        if not equals or any(not part for part in path):
            raise ConfigError(f"--set {setting!r}: expected SECTION.FIELD=VALUE, e.g. --set training.lr=1e-3")
        value = _number(parse_yaml(text, ConfigError, f"--set {setting!r}", "the value") if text.strip() else None)
        dotted = ".".join(path)
        if dotted in given:
            raise ConfigError(f"--set {setting!r}: {dotted} is already set by --set {given[dotted]!r}; give it once")
        given[dotted] = setting
        holder = nested
        for depth, part in enumerate(path[:-1]):
            existing = holder.setdefault(part, {})
            if not isinstance(existing, dict):
                raise ConfigError(f"--set {setting!r}: {'.'.join(path[:depth + 1])} was already set to a value")
            holder = existing
        holder[path[-1]] = value
    return nested


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as text; on a command line it means the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def merge_settings(raw: dict[str, Any], settings: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``raw`` with ``settings`` merged in, section by section (a setting replaces a value, never a section)."""
    merged = dict(raw)
    for key, value in settings.items():
        current = merged.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            merged[key] = merge_settings(current, value, f"{where}{key}.")
        elif isinstance(value, dict) and current is not None and not isinstance(current, dict):
            raise ConfigError(f"--set {where}{key}.…: {where}{key} is {current!r} in the pipeline, not a section")
        else:
            merged[key] = value
    return merged
