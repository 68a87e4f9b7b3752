"""The `eovseg` command: `eovseg demo ...`, `eovseg convert ...`, `eovseg train ...`, `eovseg evaluate ...`,
`eovseg predict ...`, `eovseg app ...`.

Every subcommand follows one convention (`eovseg.command_line`): exit status 0 on success, 2 for a usage error
(argparse), 1 with one line `eovseg COMMAND: error: ...` for bad input. Set `EOVSEG_TRACEBACK=1` to see the full
traceback instead.
"""

from __future__ import annotations

import importlib
import sys

from .command_line import EXIT_USAGE, run_command

COMMANDS = {
    "demo": "eovseg.demo",
    "convert": "eovseg.conversion_scripts.convert_original_checkpoint",
    "train": "eovseg.training.train",
    "evaluate": "eovseg.evaluation.evaluate",
    "predict": "eovseg.predict",
    "app": "eovseg.app",
    "export": "eovseg.onnx_export",
}

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: eovseg {" + ",".join(COMMANDS) + "} [options]   (eovseg COMMAND --help for its options)")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"eovseg: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if not argv or argv[0] in ("-h", "--help") else EXIT_USAGE
    module = importlib.import_module(COMMANDS[argv[0]])
    return run_command(module.main, argv[1:], prog=f"eovseg {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
