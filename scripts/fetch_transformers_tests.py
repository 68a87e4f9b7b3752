"""Fetch the common test mixins of the installed transformers (`tests/*.py` of its source distribution on PyPI) into
`.cache/transformers-<version>/`, where `pytest -m transformers_common` finds them.

The mixins are not in transformers' wheel; its sdist ships them (but not `tests/models`, `tests/pipelines` or
`tests/utils`: tests/models/eovseg/conftest.py stands in for the few modules they import from there). Nothing of
them is copied into this repository: `.cache/` is git-ignored.

    python scripts/fetch_transformers_tests.py [--dest DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

REPO = Path(__file__).resolve().parents[1]


def default_destination() -> Path:
    return REPO / ".cache" / f"transformers-{transformers.__version__}"


def fetch(dest: Path) -> Path:
    """Download the sdist of the installed version and unpack its `tests/*.py` into `dest/tests`; `dest/src/transformers`
    points to the installed package (test_pipeline_mixin imports `src/transformers` beside `tests/`)."""
    if (dest / "tests" / "__init__.py").is_file():
        return dest
    version = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"transformers=={version}", "--dest", tmp],
            check=True,
        )
        (archive,) = Path(tmp).glob("transformers-*.tar.gz")
        staging = Path(tempfile.mkdtemp(prefix=".transformers-tests-", dir=dest.parent if dest.parent.is_dir() else None))
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.split("/")[1:2] == ["tests"]]
            if not members:
                raise SystemExit(f"the sdist of transformers {version} has no tests/ folder")
            for member in members:
                member.name = "/".join(member.name.split("/")[1:])
            tar.extractall(staging, members=members, filter="data")
    # transformers' tree has an empty tests/__init__.py (the mixins import each other as a package); the sdist omits it
    (staging / "tests" / "__init__.py").touch()
    (staging / "src").mkdir()
    (staging / "src" / "transformers").symlink_to(Path(transformers.__file__).parent, target_is_directory=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(dest)  # whole or nothing: a run cut short leaves no half-filled destination
    return dest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=None, help="default: .cache/transformers-<installed version>")
    args = parser.parse_args(argv)
    print(fetch(args.dest or default_destination()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
