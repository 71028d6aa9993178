"""The repository stands alone: no tracked text cites design documents that users of the
repository do not have (the product's own docs restate what they need)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["kdrun", "conf", "docs", "tests", "scripts", "benchmarks", "hydra_plugins"]
FILES = ["README.md", "CONTRIBUTING.md", "Makefile", "pyproject.toml"]
# spelled in pieces so this file does not match itself
CITATION = re.compile("|".join(["METHODS" + r"\.md", "ARCHITECTURE" + r"\.md", "SPEC" + " §"]))


def test_no_file_cites_documents_outside_the_repository():
    paths = [ROOT / f for f in FILES]
    for folder in SCANNED:
        paths += [p for p in (ROOT / folder).rglob("*") if p.is_file() and not p.is_symlink()]
    hits = []
    for path in paths:
        if path.suffix in {".png", ".pt", ".pyc", ".ckpt"} or "__pycache__" in path.parts:
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if CITATION.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)
