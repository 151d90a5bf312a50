"""`python -m aiinfra` is the same as the `aiinfra` command."""

from aiinfra.cli import app

app(prog_name="aiinfra")
