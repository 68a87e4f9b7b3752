"""The README runs as written: every Python block of README.md is executed, in order, each in a fresh process.

Marker convention (for everyone adding README sections; also stated in a comment at the top of README.md):

- A ```python block runs by default, in a fresh `python` process (offline, no `PYTHONPATH` games beyond the
  installed package) whose working directory is one temporary folder shared by all blocks in README order, so a block
  may use what an earlier block or command of the README wrote there. It must succeed (exit status 0).
- A block that cannot run on a fresh install (it needs the authors' checkpoint, a GPU, your own data) is preceded by
  the line `<!-- readme-test: skip REASON -->`, REASON saying what it needs (e.g. "needs the authors' checkpoint");
  the README text around it must say so too. Such blocks are not run; a marker without a reason fails.
- A ```bash block preceded by `<!-- readme-test: run -->` is a command the README promises to run as written; those
  commands run (in the same shared folder, `.venv/bin/` meaning this interpreter's scripts) in the `slow` test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*(skip|run)\b(.*?)-->")
FENCE = re.compile(r"^```(\w*)\s*$")


def readme_blocks(text: str) -> list[dict]:
    """The fenced blocks of the README: language, code, line number and marker (`skip`/`run` or None, reason)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match or not match.group(1):
            i += 1
            continue
        start, language = i, match.group(1)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"README line {start + 1}: unclosed code block"
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.search(previous)
        blocks.append({
            "language": language, "line": start + 1, "code": "\n".join(lines[start + 1:end]) + "\n",
            "marker": marker.group(1) if marker else None, "reason": marker.group(2).strip() if marker else "",
        })
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
PYTHON_BLOCKS = [b for b in BLOCKS if b["language"] == "python"]
# Blocks marked "skip" are not collected at all: test_markers_are_well_formed checks that each says why.
RUNNABLE = [b for b in PYTHON_BLOCKS if b["marker"] != "skip"]


def _environment() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


def test_markers_are_well_formed():
    assert PYTHON_BLOCKS, "the README has no Python block"
    for block in BLOCKS:
        if block["marker"] == "skip":
            assert len(block["reason"]) >= 10, f"README line {block['line']}: a skip marker needs a reason"
        if block["marker"] == "run":
            assert block["language"] == "bash", f"README line {block['line']}: run markers are for bash blocks"
    # the marker convention itself is stated in the README for whoever adds a section
    assert "readme-test: skip" in README.read_text(encoding="utf-8").split("\n## ")[0]


def test_pipeline_snippets_import_eovseg():
    for block in PYTHON_BLOCKS:
        if "pipeline(" in block["code"] and "trust_remote_code=True" not in block["code"]:
            assert re.search(r"^import eovseg\b", block["code"], re.MULTILINE), (
                f"README line {block['line']}: a pipeline snippet must `import eovseg` (it registers the pipelines)"
            )


def test_snippets_use_dtype_not_the_deprecated_torch_dtype():
    # transformers 5 reads `dtype=`; `torch_dtype=` still works but warns that it is deprecated
    assert not [b["line"] for b in BLOCKS if re.search(r"\btorch_dtype\s*=", b["code"])]


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"line{b['line']}" for b in RUNNABLE])
def test_python_block_runs(block, workdir):
    result = subprocess.run([sys.executable, "-c", block["code"]], cwd=workdir, env=_environment(),
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"README block at line {block['line']} failed:\n{result.stderr[-3000:]}"


@pytest.mark.slow
def test_marked_commands_run(workdir):
    commands = [b for b in BLOCKS if b["marker"] == "run"]
    assert commands, "no README command is marked to run"
    bin_dir = Path(sys.executable).parent
    for block in commands:
        script = block["code"].replace(".venv/bin/", f"{bin_dir}/")
        result = subprocess.run(["bash", "-e", "-c", script], cwd=workdir, env=_environment(), capture_output=True,
                                text=True, timeout=900, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"README command at line {block['line']} failed:\n{result.stderr[-3000:]}"
