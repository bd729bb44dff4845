"""Where output goes: results to stdout, progress to stderr, both readable in a log file.

A cluster job or ``neurocl run ... > log`` writes to files, not terminals. There, rich would wrap
tables at 80 columns or cut numbers to ``0.9…``, and a progress bar redrawn in place becomes
hundreds of lines. So:

* :func:`results_console` (stdout) and :func:`progress_console` (stderr) are as wide as their
  content when their stream is not a terminal, so every number and label stays whole;
* bars that vanish when done are shown on terminals only (:func:`transient_progress`);
* :class:`neurocl.train.EpochLines` (a Lightning callback, kept there so that this module imports
  no Lightning) replaces Lightning's progress bar by one line per epoch when stderr is not a terminal;
* :func:`quiet_libraries` silences Lightning's banners and tips and the deprecation warnings of
  the libraries neurocl drives (not errors, nor neurocl's own warnings).
"""

from __future__ import annotations

import logging
import sys
import warnings

from rich.console import Console

# Wide enough for any table neurocl prints; rich sizes a table to its content, not to this width.
FILE_WIDTH = 10_000
# The loggers of Lightning's INFO banners ("GPU available: ...", "💡 Tip: ..."). Not their parents:
# importing lightning resets "lightning.pytorch" to INFO, which the children would inherit.
_CHATTY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def is_terminal(stream) -> bool:
    """Whether ``stream`` is an interactive terminal."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams (pytest's capture) are files
        return False


def results_console() -> Console:
    """The console for results (tables, summaries): stdout, unwrapped when it is a file."""
    return Console() if is_terminal(sys.stdout) else Console(width=FILE_WIDTH, soft_wrap=True)


def progress_console() -> Console:
    """The console for progress and notes: stderr, unwrapped when it is a file."""
    if is_terminal(sys.stderr):
        return Console(stderr=True)
    return Console(stderr=True, width=FILE_WIDTH, soft_wrap=True)


def transient_progress(enabled: bool) -> bool:
    """Whether to show a bar that vanishes when done: only on a terminal (in a file it leaves a blank line)."""
    return enabled and is_terminal(sys.stderr)


def quiet_libraries() -> None:
    """Silence Lightning's INFO banners and tips and the libraries' deprecation warnings."""
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
