"""CONTRIBUTING.md's shell commands are tests: every command in its ```bash blocks runs here, as
written, except the lines whose trailing comment carries ``[manual: <reason>]`` (the clone, the
installs and the whole suite, which would run this test again).

Commands are extracted as in ``tests/test_readme_commands.py`` (continuations joined, comments
dropped). Where they run: the walkthrough's (the section "Walkthrough: ...") in a temp "user
repository" outside the project that holds the guide's example files (the code blocks starting
with ``# <path>``), the rest in a temp copy of the project, so ``make`` and ``tests/...`` work
and nothing lands in the working tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_external_method import GUIDE, guide_files
from tests.test_readme_commands import Command, project_copy, readme_commands


def without_other_code_blocks(text: str) -> str:
    """``text`` with the lines of every fenced block but ```bash blanked (line numbers kept),
    so a ``# comment`` in a Python block is not read as a heading."""
    lines, inside = text.splitlines(), None  # None, "bash" or "other"
    for i, line in enumerate(lines):
        fence = line.strip().startswith("```")
        if inside is None and fence:
            inside = "bash" if line.strip() == "```bash" else "other"
        elif inside is not None and line.strip() == "```":
            inside, closing = None, inside
            if closing == "other":
                lines[i] = ""
            continue
        if inside == "other":
            lines[i] = ""
    return "\n".join(lines)


COMMANDS = readme_commands(without_other_code_blocks(GUIDE.read_text()))
WALKTHROUGH = "Walkthrough"  # commands under headings starting so run in the user's repository


def test_every_command_is_run_or_marked():
    assert len(COMMANDS) >= 6, [c.text for c in COMMANDS]
    for c in COMMANDS:
        whole_suite = c.text.startswith(("make test", "make install", "git clone"))
        assert c.manual or not whole_suite, f"CONTRIBUTING.md:{c.line}: needs [manual: ...]"
    run_here = [c for c in COMMANDS if not c.manual]
    assert any(c.heading.startswith(WALKTHROUGH) for c in run_here)
    assert any(c.text.startswith("python -m kdrun") for c in run_here)
    assert any(c.text.startswith("python -m pytest") for c in run_here)


def run(command: Command, cwd: Path, env: dict[str, str]) -> str:
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", "-c", command.text],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    print(f"CONTRIBUTING.md:{command.line}: {time.monotonic() - started:6.1f} s  {command.text}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"CONTRIBUTING.md:{command.line}: `{command.text}` failed ({proc.returncode}):\n"
        f"{output[-5000:]}"
    )
    return output


@pytest.mark.parametrize("place", ["user repository", "project"])
def test_contributing_commands_run(tmp_path, place):
    if place == "user repository":
        cwd = tmp_path / "my-kd"
        for rel, content in guide_files().items():
            (cwd / rel).parent.mkdir(parents=True, exist_ok=True)
            (cwd / rel).write_text(content)
    else:
        cwd = project_copy(tmp_path / "kdrun")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "KDRUN_DATA_DIR": str(tmp_path / "data"),
        # an active environment, as the Makefile expects of a user who installed kdrun
        "VIRTUAL_ENV": sys.prefix,
        "PYTHON": sys.executable,
    }
    env.pop("PYTHONPATH", None)  # the user's package is found from where they run
    commands = [
        c
        for c in COMMANDS
        if not c.manual and c.heading.startswith(WALKTHROUGH) == (place == "user repository")
    ]
    assert commands
    for command in commands:
        run(command, cwd, env)
    if place == "user repository":
        summaries = [json.loads(p.read_text()) for p in cwd.glob("outputs/runs/*/summary.json")]
        trains = [c for c in commands if c.text.startswith("python -m kdrun")]
        assert len(summaries) == len(trains)
        assert all(s["method"] == "my_pskd" for s in summaries)


def test_every_test_file_is_in_the_guide():
    text = GUIDE.read_text()
    missing = [p.name for p in sorted((ROOT / "tests").glob("test_*.py")) if p.name not in text]
    assert not missing, f"add {missing} to the table in CONTRIBUTING.md's 'Tests' section"
