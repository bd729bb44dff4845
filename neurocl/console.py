"""The one channel for messages to people: a rich console on stderr (results go to stdout).

Progress, stage headings and notices about the data (rows ignored, probes skipped) are printed
here; :mod:`warnings` is kept for library callers' misuse of an API, and :mod:`logging` is not used.
"""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True)
