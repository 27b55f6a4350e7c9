"""Every document the code, the tests and the README cite is in the repository, with the
section cited: `docs/NAME.md` and `docs/NAME.md §X` (a heading numbered X)."""

from __future__ import annotations

import re
import subprocess

from helpers import ROOT

CITE = re.compile(r"docs/([a-z-]+\.md)(?:`?\s*§([A-Z0-9]+(?:\.[0-9]+)*))?")


def cited() -> set[tuple[str, str, str | None]]:
    files = subprocess.run(["git", "ls-files", "npmerge", "tests", "scripts", "README.md", "docs", "Containerfile"],
                           capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    found = set()
    for name in files:
        path = ROOT / name
        if path.suffix not in (".py", ".md", "") or not path.is_file():
            continue
        for doc, section in CITE.findall(path.read_text(encoding="utf-8")):
            found.add((name, doc, section or None))
    return found


def test_every_cited_document_and_section_exists():
    citations = cited()
    assert len(citations) > 20  # the code does cite them
    missing = []
    for where, doc, section in sorted(citations, key=str):
        path = ROOT / "docs" / doc
        if not path.is_file():
            missing.append(f"{where}: docs/{doc}")
        elif section and not re.search(rf"^#+ {re.escape(section)}[. ]", path.read_text(encoding="utf-8"), re.M):
            missing.append(f"{where}: docs/{doc} §{section}")
    assert not missing, missing


def test_no_citation_of_documents_outside_the_repository():
    files = subprocess.run(["git", "ls-files", "npmerge", "tests", "scripts", "README.md", "docs"],
                           capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    pattern = "|".join(["SEMANTICS" + r"(-2)?\.md", "FORMAT-AND-" + "SAFETY", "DESIGN" + r"\.md", "/work/" + "shared"])
    outside = [n for n in files if (ROOT / n).suffix in (".py", ".md")
               and re.search(pattern, (ROOT / n).read_text(encoding="utf-8"))]
    assert outside == []
