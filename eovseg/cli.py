"""The `eovseg` command: `eovseg demo ...`, `eovseg convert ...`, `eovseg train ...`, `eovseg evaluate ...`.

Every subcommand exits 0 on success and 1 with a one-line `error: ...` for a user error (bad file, bad value):
the package raises those as `ValueError` (its own error classes derive from it) or `OSError` (missing or unreadable
files). Set `EOVSEG_TRACEBACK=1` to see the full traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

COMMANDS = {
    "demo": "eovseg.demo",
    "convert": "eovseg.conversion_scripts.convert_original_checkpoint",
    "train": "eovseg.training.train",
    "evaluate": "eovseg.evaluation.evaluate",
    "predict": "eovseg.predict",
    "app": "eovseg.app",
}

USER_ERRORS = (ValueError, OSError)


def run_main(main: Callable, argv: list[str] | None = None, prog: str = "eovseg") -> int:
    """Call a subcommand's `main` and turn its outcome into an exit status: 0 whatever it returns (some return their
    results), its own status when it returns an int, 1 and one line on stderr for a user error."""
    try:
        result = main(argv)
    except USER_ERRORS as err:
        if os.environ.get("EOVSEG_TRACEBACK"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    if isinstance(result, bool) or not isinstance(result, int):
        return 0
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: eovseg {" + ",".join(COMMANDS) + "} [options]   (eovseg COMMAND --help for its options)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return run_main(module.main, argv[1:], prog=f"eovseg {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
