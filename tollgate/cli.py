"""The `tollgate` command line."""

import typer

app = typer.Typer(help="Tollgate: event-sourced billing and metering for AI inference.", no_args_is_help=True)


@app.command()
def version() -> None:
    """Print the installed version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("tollgate"))


def main() -> None:
    app()
