"""The `eovseg` command: `eovseg demo ...`, `eovseg predict ...`, `eovseg app ...`, `eovseg train ...`,
`eovseg evaluate ...`, `eovseg convert ...`.

Every subcommand follows one convention (`eovseg.command_line`): exit status 0 on success, 2 for a usage error
(argparse), 1 with one line `eovseg COMMAND: error: ...` for bad input. Set `EOVSEG_TRACEBACK=1` to see the full
traceback instead.

The arguments are parsed first by the command's parser alone, whose module imports neither torch nor transformers:
`--help` and usage errors answer at once; the command's module (and torch) is imported only to do the work.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

from .command_line import EXIT_STATUS_EPILOG, HelpFormatter, run_command


class Command(NamedTuple):
    module: str  # its `main(argv)` does the work
    parser: str  # "module:function" building its argument parser, importable without torch
    summary: str


COMMANDS = {
    "demo": Command("eovseg.demo", "eovseg.demo:build_parser",
                    "segment one image (default: the bundled toy model and scene); write the input, its overlay and a "
                    "legend side by side in one PNG, and a JSON"),
    "predict": Command("eovseg.predict", "eovseg.predict:build_parser",
                       "segment images, folders and videos; write COCO panoptic JSON, PNGs and overlays"),
    "app": Command("eovseg.app", "eovseg.app:build_parser", "the web page: segment an image in the browser (Gradio)"),
    "train": Command("eovseg.training.train", "eovseg.parsers:train_parser",
                     "train or fine-tune a model (Accelerate); write the model folder and metrics"),
    "evaluate": Command("eovseg.evaluation.evaluate", "eovseg.parsers:evaluate_parser",
                        "panoptic quality, mIoU and mask AP of a model on a data set"),
    "convert": Command("eovseg.conversion_scripts.convert_original_checkpoint", "eovseg.parsers:convert_parser",
                       "convert an original EOV-Seg checkpoint into a Transformers model folder"),
    "export": Command("eovseg.onnx_export", "eovseg.onnx_export:build_parser",
                      "export a model folder to ONNX or OpenVINO graphs (image path and text tower)"),
}


def command_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of `eovseg NAME`, built without importing the command's module."""
    module, function = COMMANDS[name].parser.split(":")
    return getattr(importlib.import_module(module), function)()


def top_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<9} {command.summary}" for name, command in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="eovseg", usage="eovseg <command> [options]", formatter_class=HelpFormatter,
        description="EOV-Seg open-vocabulary panoptic segmentation: inference, training, evaluation, conversion.",
        epilog=f"commands:\n{listing}\n\n'eovseg <command> --help' shows a command's options.\n"
               + EXIT_STATUS_EPILOG.format(prog="eovseg <command>"),
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="<command>", help=argparse.SUPPRESS)
    parser.add_argument("options", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        return run_command(_top_level, argv, prog="eovseg")
    name, options = argv[0], argv[1:]
    status = run_command(command_parser(name).parse_args, options, prog=f"eovseg {name}")
    if status or any(option in ("-h", "--help") for option in options):
        return status  # help printed, or a usage error: nothing to import
    module = importlib.import_module(COMMANDS[name].module)
    return run_command(module.main, options, prog=f"eovseg {name}")


def _top_level(argv: list[str]) -> None:
    """`eovseg`, `eovseg --help`: the commands; anything else is a usage error."""
    parser = top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
    else:
        parser.error(f"unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})")


if __name__ == "__main__":
    sys.exit(main())
