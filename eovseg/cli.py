"""The `eovseg` command: `eovseg demo ...`, `eovseg convert ...`, `eovseg train ...`, `eovseg evaluate ...`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": "eovseg.demo",
    "convert": "eovseg.conversion_scripts.convert_original_checkpoint",
    "train": "eovseg.training.train",
    "evaluate": "eovseg.evaluation.evaluate",
    "predict": "eovseg.predict",
    "app": "eovseg.app",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: eovseg {" + ",".join(COMMANDS) + "} [options]   (eovseg COMMAND --help for its options)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
