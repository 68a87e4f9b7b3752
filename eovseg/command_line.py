"""The one error path and exit-status convention of every `eovseg` command, and the argument types they share.

Exit status of every command (`eovseg COMMAND ...`, `python -m eovseg.MODULE ...`, or its `main(argv)` called from
Python):

* 0: success;
* 2: a usage error, found while the arguments are parsed (an unknown option, a missing one, a value out of range:
  argparse's `usage: ...` and `eovseg COMMAND: error: ...`);
* 1: bad input found after parsing (a file, a data set, a model folder or a value the command cannot use), printed as
  one line `eovseg COMMAND: error: MESSAGE` on stderr. Set `EOVSEG_TRACEBACK=1` to see the traceback instead.

A command's `main` is `command_main(run, "train")`: `run(argv)` does the work and raises; this module's
[`run_command`] is the single place that catches the project's error types ([`USER_ERRORS`]) and prints the line.

Progress bars, one rule for every command (docs/commands.md, "Progress"): each bar, the command's own ([`progress_bar`])
and transformers' (loading and writing weights), is drawn once its step has run [`PROGRESS_DELAY`] seconds (`TQDM_DELAY`
changes it), so a step done sooner prints nothing; `--no_progress` ([`add_progress_option`], applied by
[`progress_switch`]) turns off all of them, transformers', huggingface_hub's and datasets' included, as do
`HF_HUB_DISABLE_PROGRESS_BARS=1` and `TQDM_DISABLE=1`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
import textwrap
from collections.abc import Callable, Sequence

__all__ = [
    "CommandError",
    "EXIT_BAD_INPUT",
    "EXIT_USAGE",
    "HelpFormatter",
    "NO_PROGRESS_HELP",
    "PROGRESS_DELAY",
    "add_progress_option",
    "USER_ERRORS",
    "command_main",
    "command_parser",
    "error_line",
    "finite_float",
    "non_negative_float",
    "non_negative_int",
    "non_empty_text",
    "positive_float",
    "port_number",
    "positive_int",
    "probability",
    "progress_bar",
    "progress_switch",
    "run_command",
]

EXIT_BAD_INPUT = 1
FLOAT32_MAX = 3.4028234663852886e38
EXIT_USAGE = 2


class CommandError(ValueError):
    """Bad input a command cannot use: reported as one line, exit status 1. The package's other one-line errors
    derive from `ValueError` (or are `OSError`s for missing or unreadable files) and are reported the same way."""


# What a user's input can cause: anything else is a bug and keeps its traceback. KeyError and TypeError come from
# malformed data-set rows and category lists (a missing key, a value of the wrong type).
USER_ERRORS = (ValueError, KeyError, TypeError, OSError)


def output_dir_problem(output_dir) -> str | None:
    """Why `--output_dir` cannot be a folder here (it, or a folder above it, is a file), or None."""
    from pathlib import Path

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        return f"--output_dir {str(output_dir)!r} is a file."
    in_file = [parent for parent in output_dir.parents if parent.exists() and not parent.is_dir()]
    if in_file:
        return f"--output_dir {str(output_dir)!r} cannot be made: {str(in_file[0])!r} is a file."
    return None


def error_line(error: BaseException) -> str:
    """The first line of an error's message (a KeyError's key without its quotes), or its type's name."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    text = str(message).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_command(run: Callable, argv: Sequence[str] | None = None, prog: str = "eovseg") -> int:
    """Call `run(argv)` and turn its outcome into an exit status: its own status when it returns an int (not a
    bool), else 0; 2 when argparse stops on a usage error; 1 and one line `PROG: error: ...` on stderr for a user
    error."""
    try:
        result = run(argv)
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2), already printed
        if stop.code is None or isinstance(stop.code, int):
            return int(stop.code or 0)
        print(f"{prog}: error: {stop.code}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except USER_ERRORS as error:
        if os.environ.get("EOVSEG_TRACEBACK"):
            raise
        print(f"{prog}: error: {error_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if isinstance(result, bool) or not isinstance(result, int):
        return 0
    return result


def command_main(run: Callable, command: str) -> Callable[[Sequence[str] | None], int]:
    """The `main(argv) -> exit status` of the command `eovseg COMMAND` whose work is `run(argv)`."""

    @functools.wraps(run)
    def main(argv: Sequence[str] | None = None) -> int:
        return run_command(run, argv, prog=f"eovseg {command}")

    main.__doc__ = f"`eovseg {command}`: exit status 0, 1 for bad input (one line), 2 for a usage error."
    return main


# ----------------------------------------------------------------------------------------------------------------------
# Help
# ----------------------------------------------------------------------------------------------------------------------

EXIT_STATUS_EPILOG = """\
exit status: 0 done; 1 bad input, reported in one line "{prog}: error: ..." (EOVSEG_TRACEBACK=1 shows the
traceback instead); 2 a usage error."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The commands' help: the description as written (its example lines kept), and each option's default after its
    help, unless the help states it already or there is none to state (an option that is off or unset by default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "(default" in text or "default:" in text or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool) or default == []):
            return text
        return f"{text} (default: %(default)s)"

    def _split_lines(self, text: str, width: int) -> list[str]:
        # not at hyphens: "--test_shortest_edge" or "held-out" stay whole on one line
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def command_parser(command: str, description: str) -> argparse.ArgumentParser:
    """The argument parser of `eovseg COMMAND`: its usage line `eovseg COMMAND ...` and error lines
    `eovseg COMMAND: error: ...`, the defaults shown, the exit statuses at the end."""
    prog = f"eovseg {command}"
    return argparse.ArgumentParser(prog=prog, description=description, epilog=EXIT_STATUS_EPILOG.format(prog=prog),
                                   formatter_class=HelpFormatter)


# ----------------------------------------------------------------------------------------------------------------------
# Argument types: out-of-range values are usage errors, refused while the arguments are parsed
# ----------------------------------------------------------------------------------------------------------------------


def _number(kind: type, text: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    # the model computes in float32 (or narrower): a value past float32's range is infinite there
    if kind is float and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise argparse.ArgumentTypeError(f"expected a finite number within float32's range, got {text!r}")
    return value


def _bounded(kind: type, name: str, accept: Callable[[float], bool], what: str):
    def parse(text: str):
        value = _number(kind, text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


positive_int = _bounded(int, "positive_int", lambda v: v > 0, "a positive integer")
non_negative_int = _bounded(int, "non_negative_int", lambda v: v >= 0, "0 or a positive integer")
finite_float = _bounded(float, "finite_float", lambda v: True, "a finite number")
positive_float = _bounded(float, "positive_float", lambda v: v > 0, "a positive number")
non_negative_float = _bounded(float, "non_negative_float", lambda v: v >= 0, "0 or a positive number")
probability = _bounded(float, "probability", lambda v: 0 <= v <= 1, "a probability between 0 and 1")
port_number = _bounded(int, "port_number", lambda v: 1 <= v <= 65535, "a port number 1-65535")


def non_empty_text(text: str) -> str:
    """A name, a path or a class entry: an empty (or blank) one is a usage error, where a command would otherwise
    take it for "not given" and fall back on a default without a word."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty, got {text!r}")
    return text


# ----------------------------------------------------------------------------------------------------------------------
# Progress bars
# ----------------------------------------------------------------------------------------------------------------------

# Seconds a step runs before its bar is drawn: loading the toy model (a few hundredths of a second) prints no bar,
# where a slow load of a converted checkpoint or a text pass of 150 classes on a CPU (minutes) shows one.
PROGRESS_DELAY = 1.0

NO_PROGRESS_HELP = ("no progress bars at all: neither the command's own nor those of transformers, huggingface_hub and "
                    "datasets (loading and writing weights, reading data sets)")


def add_progress_option(parser) -> None:
    """`--no_progress`, worded once for every long-running command (a parser or an argument group)."""
    parser.add_argument("--no_progress", action="store_true", help=NO_PROGRESS_HELP)


def progress_delay() -> float:
    """[`PROGRESS_DELAY`], or tqdm's own `TQDM_DELAY` where it is set (0 draws every bar at once)."""
    try:
        return max(0.0, float(os.environ.get("TQDM_DELAY", PROGRESS_DELAY)))
    except ValueError:
        return PROGRESS_DELAY


def progress_bar(iterable=None, *, enabled: bool = True, **tqdm_options):
    """A progress bar of the package (tqdm's arguments): transformers' tqdm, so that whatever turns transformers'
    bars off turns it off too (`--no_progress`, `transformers.utils.logging.disable_progress_bar()`,
    `HF_HUB_DISABLE_PROGRESS_BARS=1`), drawn after [`progress_delay`]. `enabled=False` (another process than the
    main one, or a caller's choice) turns this bar off; `disable=False` is never passed, so `TQDM_DISABLE=1` holds."""
    from transformers.utils import logging as hf_logging

    if not enabled:
        tqdm_options["disable"] = True
    tqdm_options.setdefault("delay", progress_delay())
    return hf_logging.tqdm(iterable, **tqdm_options)


def _delayed(factory, args, kwargs):
    """transformers' tqdm hook within a command: every bar made through it (transformers' own, the package's, the
    model's text pass) waits [`progress_delay`]."""
    return factory(*args, **{**kwargs, "delay": progress_delay()})


@contextlib.contextmanager
def progress_switch(enabled: bool = True):
    """Within the block, the progress bars of a command run with `--no_progress` (`enabled=False`), or in another
    process than a machine's first under torchrun / accelerate launch, are all off: the package's, transformers',
    huggingface_hub's and datasets'; transformers' bars are delayed as the package's are. Each library's setting is
    restored afterwards (a command called from Python leaves the caller's as it was)."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    enabled = enabled and os.environ.get("LOCAL_RANK", "0") == "0"  # one machine's bars once, not once per process
    previous_hook = hf_logging.set_tqdm_hook(_delayed)
    try:
        if enabled:
            yield
            return
        import datasets

        was = (hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled(),
               datasets.utils.are_progress_bars_disabled())
        hf_logging.disable_progress_bar()  # and huggingface_hub's
        datasets.disable_progress_bars()
        try:
            yield
        finally:
            if was[0]:
                hf_logging.enable_progress_bar()
            (hub_utils.disable_progress_bars if was[1] else hub_utils.enable_progress_bars)()
            if not was[2]:
                datasets.enable_progress_bars()
    finally:
        hf_logging.set_tqdm_hook(previous_hook)
