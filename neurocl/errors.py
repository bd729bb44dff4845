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
