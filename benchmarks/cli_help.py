"""Wall time of `eovseg --help` and of `eovseg COMMAND --help` for every command, each in a fresh process, and
whether the process imported torch or transformers (it must not: `eovseg.cli` parses with the command's light parser
and imports the command's module only to do the work).

    python benchmarks/cli_help.py [--repeats 5]

Prints one line per command: the median and the slowest of the runs, in seconds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from eovseg.cli import COMMANDS

PROBE = (
    "import sys\n"
    "from eovseg.cli import main\n"
    "main(sys.argv[1:])\n"
    "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
    "sys.stderr.write('IMPORTED ' + ','.join(heavy) + '\\n')\n"
)


def time_help(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *command, "--help"], capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - start
    imported = done.stderr.rsplit("IMPORTED ", 1)[-1].strip()
    return elapsed, imported or "neither"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs per command (default: 5)")
    args = parser.parse_args()
    print(f"{'command':<26} {'median s':>9} {'max s':>7}  torch/transformers imported")
    for name in ["", *COMMANDS]:
        runs = [time_help([name] if name else []) for _ in range(args.repeats)]
        seconds = [s for s, _ in runs]
        label = f"eovseg {name} --help".replace("  ", " ")
        print(f"{label:<26} {statistics.median(seconds):>9.2f} {max(seconds):>7.2f}  {runs[-1][1]}")


if __name__ == "__main__":
    main()
