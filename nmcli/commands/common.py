"""What every command shares: the two consoles, the common options, one-line errors, JSON output."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from nmcli.errors import NMSparseError
from nmcli.nm import CONVENTION

PATTERN_HELP = f"N:M pattern, keep-N convention ({CONVENTION}), e.g. 2:4, 1:8, 1:32"
EXIT_ERROR = 2
EXIT_CHECK_FAILED = 1

# No markup or emoji in anything printed: paths, layer names and messages are shown as they are ("x[/].pt" or
# "N:M:" would otherwise be read as markup or an emoji code); the few styled words use explicit styles.
# soft_wrap: a printed line is never broken, whatever the terminal's width or where the output goes (a log, a pipe,
# a script reading it line by line); a terminal folds a long line itself. Tables still fit the width.
_PLAIN = {"markup": False, "emoji": False, "highlight": False, "soft_wrap": True}
out = Console(**_PLAIN)
if not out.is_terminal:  # piped output: wide enough that tables do not fold layer names
    out = Console(width=200, **_PLAIN)
err = Console(stderr=True, **_PLAIN)
if not err.is_terminal:
    err = Console(stderr=True, width=200, **_PLAIN)
STATE = {"debug": bool(os.environ.get("NMSPARSE_DEBUG"))}

Source = Annotated[str, typer.Argument(help="safetensors file, sharded/Hugging Face folder, or timm model name")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="timm model name, for exact targets and FLOPs")]
CheckpointOpt = Annotated[
    Optional[Path], typer.Option("--checkpoint", help="weights for a timm SOURCE: .safetensors or .pth (weights only)")
]
IncludeOpt = Annotated[Optional[list[str]], typer.Option("--include", help="only layers matching this glob (repeat)")]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option("--exclude", help="skip layers matching this glob (repeat)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON only")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar, only the result")]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed for random init of a timm SOURCE without --checkpoint")]
ForceOpt = Annotated[bool, typer.Option("--force", help="replace an existing output")]
DeviceOpt = Annotated[str, typer.Option("--device", help="where the model computes: cpu or cuda")]
EvalDataOpt = Annotated[Optional[list[str]], typer.Option(
    "--eval-data", help="HF models: another held-out set (.txt/.md/.jsonl, a folder; repeat), scored besides the data's "
    "own held-out part and the built-in general-domain 'news'"
)]
ModelKwargsOpt = Annotated[Optional[str], typer.Option("--model-kwargs", help="JSON kwargs for timm.create_model")]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """One line on stderr and a non-zero exit for bad input; the traceback only with --debug."""
    try:
        yield
    except NMSparseError as exc:
        if STATE["debug"]:
            raise
        err.print(Text.assemble(("error:", "red"), f" {exc}"))
        raise typer.Exit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        err.print(Text.assemble(("interrupted", "red"), ": nothing was written"))
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # noqa: BLE001 - last line of defence: no traceback for users
        if STATE["debug"]:
            raise
        err.print(Text.assemble(("error:", "red"), f" {_describe(exc)}"))
        raise typer.Exit(EXIT_ERROR) from None


def _describe(exc: Exception) -> str:
    """An error no check foresaw: a full disk said as such, anything else named with how to see the traceback."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing {exc.filename}" if exc.filename else ""
        return f"the disk is full{where} ({exc.strerror}): free some space or write --out to another disk"
    return f"unexpected {type(exc).__name__}: {exc} (run `nmsparse --debug ...` for the traceback)"


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def json_option(text: Optional[str], name: str) -> dict:
    """A JSON-object option (--model-kwargs): {} when absent, a one-line error when not an object."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NMSparseError(f"{name} {text!r}: not valid JSON ({exc.msg}); e.g. '{{\"img_size\": 32}}'") from None
    if not isinstance(value, dict):
        raise NMSparseError(f"{name} {text!r}: expected a JSON object")
    return value


def is_main_rank() -> bool:
    """Under torchrun only rank 0 prints results and progress."""
    return int(os.environ.get("RANK", "0")) == 0
