"""The ``skipdeploy`` command line: one module per command (polygraphy's layout), shared option
groups in ``options.py``.

Exit status: 0 on success, 1 on a user error (one line on stderr, no traceback), 2 on a usage
error (click's own).
"""

from __future__ import annotations

import importlib
import sys

import click

from .. import __version__
from ..errors import SkipDeployError

# (module, what it does), in the order --help lists them.
COMMANDS = ("demo", "export", "quantize", "inspect", "schedule", "generate", "serve", "triton", "capi", "verify",
            "bench", "build_engines", "finetune", "eval")


class _Group(click.Group):
    """Turns every SkipDeployError (and OS errors such as a full disk) into one line and exit 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SkipDeployError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # the order of COMMANDS, not alphabetical


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="skipdeploy")
def main() -> None:
    """Deploy SkipDecode models (OPT, Llama, Mistral, Qwen2): per-layer ONNX graphs plus a small batched runtime.

    \b
    Start here (offline, about a minute):
      skipdeploy demo
    \b
    Typical use:
      skipdeploy export facebook/opt-125m --out opt-125m-sd --target-speedup 2
      skipdeploy inspect opt-125m-sd
      skipdeploy generate opt-125m-sd --prompt "def fib(n):" --max-new-tokens 32
    """


for _name in COMMANDS:
    main.add_command(importlib.import_module(f".{_name}", __name__).command)

__all__ = ["main"]
