"""``skipdeploy capi``: build the C library (cffi embedding) with its header and pkg-config file."""

from __future__ import annotations

from pathlib import Path

import click

from .options import json_option


@click.command("capi")
@click.option("--out", "-o", "out", required=True, type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="Where to write lib/libskipdeploy.so, include/skipdeploy.h and lib/pkgconfig/skipdeploy.pc.")
@click.option("--force", is_flag=True, help="Replace an earlier build in DIR.")
@click.option("--verbose", is_flag=True, help="Show the compiler's commands.")
@json_option("the paths written")
def command(out: Path, force: bool, verbose: bool, as_json: bool) -> None:
    """Build the C API: a shared library that runs skipdeploy inside a C or C++ program.

    The library embeds this Python (its libpython, by rpath, and this environment's packages),
    so it works in a process started with an empty environment; rebuild it (--force) after
    moving or upgrading the environment. Needs cffi (pip install 'skipdeploy[capi]') and a C
    compiler. Link with:

    \b
      PKG_CONFIG_PATH=DIR/lib/pkgconfig cc prog.c $(pkg-config --cflags --libs skipdeploy)
    """
    import json

    from ..capi.build import build

    result = build(out, force=force, verbose=verbose)
    if as_json:
        click.echo(json.dumps({"library": str(result.library), "header": str(result.header),
                               "pkgconfig": str(result.pkgconfig), "python": result.python,
                               "seconds": round(result.seconds, 3)}))
        return
    prefix = result.library.parent.parent
    click.echo(f"library   {result.library} (embeds {result.python})")
    click.echo(f"header    {result.header}")
    click.echo(f"pkgconfig {result.pkgconfig}")
    click.echo(f"built in {result.seconds:.1f} s; compile and link with:")
    click.echo(f"  PKG_CONFIG_PATH={prefix}/lib/pkgconfig cc prog.c $(pkg-config --cflags --libs skipdeploy)")
