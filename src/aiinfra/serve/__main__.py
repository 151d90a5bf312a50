"""`python -m aiinfra.serve MODEL [options]`: the server without the rest of the command line (benchmarks use it)."""

import typer

from aiinfra.serve.commands import serve_command

if __name__ == "__main__":
    typer.run(serve_command)
