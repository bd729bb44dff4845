"""Errors that reach the user as one clear message (the CLI prints them without a traceback)."""


class NeuroclError(Exception):
    """Base class: anything the user can fix by changing their input or configuration."""


class CohortError(NeuroclError):
    """A cohort spec, participants table or image is unusable."""


class ConfigError(NeuroclError):
    """A pipeline or option value is invalid; the message names the field."""


class TrainingError(NeuroclError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step and the term."""


class OutputError(NeuroclError):
    """An output cannot be written (disk full, read-only or occupied destination); names the path."""


class StoreError(NeuroclError):
    """The preprocessed store cannot be written or read (disk space, a file, a lock); the message names the path."""


def validation_message(source: str, error, top: str = "(top level)", hint=None) -> str:
    """One line per problem of a pydantic ``ValidationError``: ``source: field.path: message (got value)``.

    The one formatter of configuration errors (pipelines, cohort specs, command options), so that
    every bad value is reported alike: the file or option group, the dotted field, pydantic's
    message without its ``Value error, `` prefix, and the value given (omitted for a missing field
    and for a validator's own message, which names the value itself). ``top`` names a problem of the
    whole model (no field). ``hint(item)``, when given, adds text to the line of each pydantic
    error item (e.g. the nearest field to an unknown one, :func:`neurocl.settings.unknown_field_hint`).
    """
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or top
        message = item["msg"].removeprefix("Value error, ")
        given = "" if item["type"] in ("missing", "value_error") else f" (got {item.get('input')!r})"
        lines.append(f"{source}: {where}: {message}{given}{hint(item) if hint else ''}")
    return "\n".join(lines)
