"""README's two newcomer commands stay true: the merge command runs as written (output
redirected to a temp dir), and CI runs exactly the README's test command."""

from __future__ import annotations

import re
import shlex

from helpers import ROOT, load_model, npmerge


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_the_readme_test_command():
    _, test_cmd = readme_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines


def test_readme_merge_command_works(tmp_path, monkeypatch):
    install_and_merge, _ = readme_commands()
    install, merge = install_and_merge.split(" && ")
    assert install.startswith("python -m pip install -e")
    args = shlex.split(merge)
    assert args[:2] == ["npmerge", "ties"]
    out_at = args.index("-o") + 1
    args[out_at] = str(tmp_path / "demo")
    monkeypatch.chdir(ROOT)
    npmerge(*args[1:])
    assert load_model(tmp_path / "demo")
