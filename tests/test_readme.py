"""The README and the documentation run as written: every Python block of README.md and of docs/*.md is executed, in
order, each in a fresh process.

Marker convention (for everyone adding README sections or docs pages; also stated in a comment at the top of
README.md and in docs/getting_started.md):

- A ```python block runs by default, in a fresh `python` process (offline, no `PYTHONPATH` games beyond the
  installed package) whose working directory is one temporary folder per file, shared by all blocks of that file in
  order, so a block may use what an earlier block or command of the same file wrote there. It must succeed (exit
  status 0). A block identical to one already collected (the README's snippets are repeated in docs/) runs once: the
  same code on the same installed package gives the same result, and the default run stays short.
- A block that cannot run on a fresh install (it needs the authors' checkpoint, a GPU, your own data) is preceded by
  the line `<!-- readme-test: skip REASON -->`, REASON saying what it needs (e.g. "needs the authors' checkpoint");
  the text around it must say so too. Such blocks are not run; a marker without a reason fails.
- A ```bash block preceded by `<!-- readme-test: run -->` is a command the page promises to run as written; those
  commands run (in the same per-file folder, `.venv/bin/` meaning this interpreter's scripts) in the `slow` test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The README first, so a snippet repeated in docs/ is run (and reported) under the README's line number.
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200
# The README's second command; .ci/run must run exactly this line.
TEST_COMMAND = 'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest -m "not slow"'
MARKER = re.compile(r"<!--\s*readme-test:\s*(skip|run)\b(.*?)-->")
FENCE = re.compile(r"^```(\w*)\s*$")


def readme_blocks(text: str, document: str = "README.md") -> list[dict]:
    """The fenced blocks of a Markdown file: language, code, line number and marker (`skip`/`run` or None, reason)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match or not match.group(1):
            i += 1
            continue
        start, language = i, match.group(1)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{document} line {start + 1}: unclosed code block"
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.search(previous)
        blocks.append({
            "document": document, "language": language, "line": start + 1,
            "code": "\n".join(lines[start + 1:end]) + "\n",
            "marker": marker.group(1) if marker else None, "reason": marker.group(2).strip() if marker else "",
        })
        i = end + 1
    return blocks


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _runnable_once(blocks: list[dict]) -> list[dict]:
    """The Python blocks to run: not marked "skip", and each distinct code once (its first occurrence)."""
    runnable, seen = [], set()
    for block in blocks:
        if block["language"] == "python" and block["marker"] != "skip" and block["code"] not in seen:
            seen.add(block["code"])
            runnable.append(block)
    return runnable


BLOCKS = [b for path in DOCUMENTS for b in readme_blocks(path.read_text(encoding="utf-8"), _name(path))]
PYTHON_BLOCKS = [b for b in BLOCKS if b["language"] == "python"]
# Blocks marked "skip" are not collected at all: test_markers_are_well_formed checks that each says why.
RUNNABLE = _runnable_once(BLOCKS)


def _id(block: dict) -> str:
    return f"{block['document']}:line{block['line']}"


def _environment() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return env


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """One temporary folder per document, made when its first block runs."""
    folders = {}

    def folder(document: str) -> Path:
        if document not in folders:
            folders[document] = tmp_path_factory.mktemp(re.sub(r"\W", "_", document))
        return folders[document]

    return folder


def test_markers_are_well_formed():
    assert [b for b in PYTHON_BLOCKS if b["document"] == "README.md"], "the README has no Python block"
    assert len(DOCUMENTS) > 1 and [b for b in PYTHON_BLOCKS if b["document"] != "README.md"], "docs/ has no Python block"
    for block in BLOCKS:
        if block["marker"] == "skip":
            assert len(block["reason"]) >= 10, f"{_id(block)}: a skip marker needs a reason"
        if block["marker"] == "run":
            assert block["language"] == "bash", f"{_id(block)}: run markers are for bash blocks"
    # the marker convention itself is stated in the README for whoever adds a section
    assert "readme-test: skip" in README.read_text(encoding="utf-8").split("\n## ")[0]


def test_readme_is_a_front_door_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    bash = [b["code"].strip() for b in BLOCKS if b["document"] == "README.md" and b["language"] == "bash"]
    assert "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m eovseg.demo" in bash
    assert TEST_COMMAND in bash
    # CI runs the README's test command as written
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_pipeline_snippets_import_eovseg():
    for block in PYTHON_BLOCKS:
        if "pipeline(" in block["code"] and "trust_remote_code=True" not in block["code"]:
            assert re.search(r"^import eovseg\b", block["code"], re.MULTILINE), (
                f"{_id(block)}: a pipeline snippet must `import eovseg` (it registers the pipelines)"
            )


def test_snippets_use_dtype_not_the_deprecated_torch_dtype():
    # transformers 5 reads `dtype=`; `torch_dtype=` still works but warns that it is deprecated
    assert not [_id(b) for b in BLOCKS if re.search(r"\btorch_dtype\s*=", b["code"])]


@pytest.mark.parametrize("block", RUNNABLE, ids=[_id(b) for b in RUNNABLE])
def test_python_block_runs(block, workdirs):
    result = subprocess.run([sys.executable, "-c", block["code"]], cwd=workdirs(block["document"]), env=_environment(),
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"block at {_id(block)} failed:\n{result.stderr[-3000:]}"


@pytest.mark.slow
def test_marked_commands_run(workdirs):
    commands = [b for b in BLOCKS if b["marker"] == "run"]
    assert commands, "no command of the README or docs/ is marked to run"
    bin_dir = Path(sys.executable).parent
    for block in commands:
        script = block["code"].replace(".venv/bin/", f"{bin_dir}/")
        result = subprocess.run(["bash", "-e", "-c", script], cwd=workdirs(block["document"]), env=_environment(),
                                capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"command at {_id(block)} failed:\n{result.stderr[-3000:]}"
