"""Dotted command-line settings for a pipeline: ``--set training.lr=1e-3 --set method.lam_mi=50``.

Each value is read as a YAML scalar or flow collection (``1e-3`` is a number, as is any text
that Python's ``float`` reads, ``true`` a boolean,
``[age, sex]`` a list, ``null`` None), then merged into the pipeline's YAML before the schema
validates the result, so a setting is checked exactly like the same line in the file. Values are
read by the one YAML reader (:func:`neurocl.io.parse_yaml`: a flow mapping that repeats a key is
refused), and a field set twice is refused rather than the last setting winning unseen.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Sequence

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


def nearest_field(name: str, fields: Sequence[str]) -> str | None:
    """The field ``name`` was most likely meant to be, or None when none is close.

    In order: the same name without underscores or in another case (``batchsize`` ->
    ``batch_size``); difflib's nearest match with a similarity ratio of at least 0.75 (``lam_mmi``
    -> ``lam_mi``, ``epoch`` -> ``epochs``); a field that the name extends by whole ``_`` words, or
    that extends the name, the longest first (``lr_rate`` -> ``lr``, ``warmup`` -> ``warmup_steps``);
    difflib's nearest match above 0.6.
    """
    squashed = {field.replace("_", "").lower(): field for field in fields}
    if name.replace("_", "").lower() in squashed:
        return squashed[name.replace("_", "").lower()]
    close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.75)
    if close:
        return close[0]
    words = [field for field in fields if name.startswith(f"{field}_") or field.startswith(f"{name}_")]
    if words:
        return max(words, key=len)
    close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_field_hint(fields_at: Callable[[tuple], Sequence[str] | None]) -> Callable[[dict], str]:
    """A hint for :func:`neurocl.errors.validation_message`: what an unknown field was probably meant to be.

    ``fields_at(location)`` gives the fields of the section at ``location`` (``("training",)``; ``()``
    for the top level), or None where there is no section. For a pydantic ``extra_forbidden``
    error at ``training.lr_rate`` the hint reads ``; did you mean training.lr? (training fields:
    optimizer, lr, ...)``; for any other error it is empty.
    """

    def hint(item: dict) -> str:
        *section, name = item["loc"] or ("",)
        fields = fields_at(tuple(section)) if item["type"] == "extra_forbidden" and isinstance(name, str) else None
        if not fields:
            return ""
        where = ".".join(str(part) for part in section)
        near = nearest_field(name, fields)
        suggestion = f"; did you mean {where + '.' if where else ''}{near}?" if near else ""
        return f"{suggestion} ({f'{where} fields' if where else 'top-level fields'}: {', '.join(fields)})"

    return hint
