"""``python -m neurocl``: the same as the ``neurocl`` command."""

from neurocl.cli import app

app(prog_name="neurocl")
