"""The CLI behaves like the tools people know (issue 15): results on stdout and
diagnostics on stderr, a --dry-run that refuses exactly what the real run refuses (the
bad-input catalogue of test_bad_inputs.py, replayed with --dry-run), help with panels,
examples and exit codes, a hint for `--density 0.5 0.3`, --version, shell completion,
and models named by Hub id from a Hugging Face cache built in a temporary directory
(no network): names in the summary and report, commits recorded, the card's front matter
parsed as YAML. Oracles: the official safetensors library, a merge of the same files by
path, yaml.safe_load, and versions.describe_versions."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from helpers import FIXTURES, LLAMA, LLAMA_F32, ROOT
from test_bad_inputs import REFUSED, _CASES, _run_case, _staging
from test_hub import C1, C2, C3, add_snapshot, model_files

BASE, FA, FB, FC = LLAMA / "base", LLAMA / "ft-a", LLAMA / "ft-b", LLAMA / "ft-c"
HUB_ENV = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "TRANSFORMERS_OFFLINE")


def cli(*args, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m npmerge ARGS` with stdout and stderr as pipes (not a terminal), as `| less` sees it."""
    full = {k: v for k, v in os.environ.items() if k not in HUB_ENV}
    full.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                     os.environ.get("PYTHONPATH")]))})
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "npmerge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=full, timeout=600)


def flat(text: str) -> str:
    """Help text without its boxes and line wrapping."""
    return re.sub(r"[\s│╭╮╰╯─┃┏┓┗┛━]+", " ", text)


def tensors_of(model_dir: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype code, shape) through the official safetensors library."""
    codes = {"bfloat16": "BF16", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "bool": "BOOL"}
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                out[k] = (codes.get(sl.get_dtype().lower(), sl.get_dtype()), list(sl.get_shape()))
    return out


# -- stdout for results, stderr for diagnostics ---------------------------------------------------
def test_info_is_on_stdout():
    proc = cli("info", BASE)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "LlamaForCausalLM" in proc.stdout and f"{len(tensors_of(BASE))}" in proc.stdout
    piped = subprocess.run(f"{shlex_join(sys.executable, '-m', 'npmerge', 'info', BASE)} | cat", shell=True,
                           capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=ROOT)
    assert "LlamaForCausalLM" in piped.stdout  # what `npmerge info M | less` pages


def shlex_join(*words) -> str:
    import shlex

    return " ".join(shlex.quote(str(w)) for w in words)


def test_dry_run_plan_is_on_stdout_and_shows_dtypes_memory_and_passes(tmp_path):
    args = ["ties", BASE, FA, FB, "-d", "0.2", "--out-dtype", "float32", "--max-memory", "4GiB", "-o", tmp_path / "o",
            "--dry-run"]
    human, machine = cli(*args, env={"COLUMNS": "200"}), cli(*args, "--json")
    assert human.returncode == machine.returncode == 0
    assert human.stderr == machine.stderr == ""
    assert not (tmp_path / "o").exists() and os.listdir(tmp_path) == []
    plan = json.loads(machine.stdout)
    want = tensors_of(BASE)
    assert {t["name"]: (t["in_dtypes"], t["shape"]) for t in plan["tensors"]} == \
        {n: ([d] * 3, s) for n, (d, s) in want.items()}
    assert {t["out_dtype"] for t in plan["tensors"]} == {"F32"}
    assert plan["input_passes"] == pytest.approx(plan["streamed_bytes"] / plan["read_bytes"])
    assert plan["memory_budget"] == 4 * 2**30
    assert plan["output"]["replaces"] is False and plan["output"]["space_free"] > plan["output"]["space_needed"]
    out = human.stdout
    for name, (dtype, shape) in want.items():  # every tensor: shape, input and output dtypes, passes
        row = rf"│ {re.escape(name)} +│ {'x'.join(map(str, shape))} +│ {dtype} +│ F32 +│ <= [23] +│"
        assert re.search(row, out), name
    assert "BF16 -> F32 (21)" in out
    assert "4.00 GiB" in out and "4.29 GB" not in out  # binary units for a binary budget
    assert f"at most {plan['input_passes']:.2f} passes" in out
    assert "(new)" in out


def test_summary_and_notes_split_and_json_unchanged(tmp_path):
    """A merge that copies integer tensors: the note goes to stderr, the summary table to stdout;
    with --json stdout is exactly the report."""
    int_dir = FIXTURES / "tiny-int"
    proc = cli("ties", int_dir / "base", int_dir / "ft-a", "-d", "0.5", "-o", tmp_path / "o")
    assert proc.returncode == 0
    assert "note: " in proc.stderr and "copied" in proc.stderr and "note:" not in proc.stdout
    assert "TIES-merging" in proc.stdout and "ft-a" in proc.stdout and "tensors merged" in proc.stdout
    proc = cli("ties", int_dir / "base", int_dir / "ft-a", "-d", "0.5", "-o", tmp_path / "j", "--json")
    report = json.loads(proc.stdout)
    assert report == json.loads((tmp_path / "j" / "merge_report.json").read_text())
    quiet = cli("ties", int_dir / "base", int_dir / "ft-a", "-d", "0.5", "-o", tmp_path / "q", "-q")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""


# -- --dry-run refuses what the real run refuses -------------------------------------------------
# Found only while the data is read or written (NaN/Inf, overflow, a full disk, an input changing
# under the merge), so after the plan: a dry run reads no tensor data.
WHILE_MERGING = {"s32-nan-in-model", "s32-inf-in-base", "s38-enospc-mid-write", "s40-input-changed",
                 "s41-overflow-f16", "i21-karcher-all-zero"}


@pytest.mark.parametrize("case", [c for c in REFUSED if c.id not in WHILE_MERGING], ids=lambda c: c.id)
@pytest.mark.timeout(60)
def test_dry_run_refuses_what_the_real_run_refuses(case, tmp_path, monkeypatch):
    """The whole bad-input catalogue with --dry-run: same exit code, same first line, same hint,
    nothing created (output, staging) and no input touched (_run_case checks)."""
    res, phrases = _run_case(case, tmp_path, monkeypatch, "--dry-run")
    assert res.code == case.code, res.err
    assert res.err.startswith("Error: ") and "Traceback" not in res.err
    for phrase in phrases:
        assert phrase in res.err.splitlines()[0], (phrase, res.err)
    if isinstance(case.hint, str):
        assert case.hint in res.err
    assert res.out == ""


def test_catalogue_cases_found_while_merging_exist():
    assert WHILE_MERGING <= set(_CASES)


def test_dry_run_with_force_and_resume(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("an earlier merge")
    args = ["linear", LLAMA_F32 / "ft-a", LLAMA_F32 / "ft-b", "-o", out, "--dry-run"]
    assert cli(*args).returncode == 2
    proc = cli(*args, "--force", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["output"]["replaces"] is True
    assert "replaces the existing directory" in cli(*args, "--force").stdout
    assert os.listdir(out) == ["old.txt"]
    # an interrupted run's staging for another plan: --resume refuses it, dry or not, and it stays as it was
    _staging(tmp_path, None)
    staging = tmp_path / ".out.npmerge-partial"
    before = sorted(os.listdir(staging)), (staging / "plan.json").read_text()
    shutil.rmtree(out)
    real, dry = cli(*args[:-1], "--resume"), cli(*args, "--resume")
    assert real.returncode == dry.returncode == 2
    assert real.stderr.splitlines()[0] == dry.stderr.splitlines()[0]
    assert "cannot resume into" in dry.stderr
    assert (sorted(os.listdir(staging)), (staging / "plan.json").read_text()) == before


# -- help ------------------------------------------------------------------------------------
def _commands() -> list[str]:
    import typer.main

    from npmerge.cli import app

    return sorted(typer.main.get_command(app).commands)


def test_root_help_lists_exit_codes_and_model_references():
    text = flat(cli("--help").stdout)
    from npmerge.cli import EXIT_CODES

    assert "Exit codes: " + "; ".join(f"{c} {w}" for c, w in EXIT_CODES) in text
    for code in (0, 1, 2, 3, 4, 5, 129, 130, 143):
        assert f" {code} " in text.split("Exit codes:")[1]
    assert "org/name@revision" in text and "Example: npmerge ties" in text
    assert "--install-completion" in text and "--version" in text


@pytest.mark.parametrize("command", _commands())
def test_command_help_has_panels_an_example_and_no_bool(command):
    proc = cli(command, "--help")
    assert proc.returncode == 0
    text = flat(proc.stdout)
    assert "<bool>" not in text
    assert "Example: npmerge " in text
    titles = re.findall(r"╭─ (\w[\w ]*?) ─", proc.stdout)
    panels = set(titles)
    assert len(titles) == len(panels), f"one panel per purpose: {titles}"
    assert "Options" not in panels and titles[-1] == "Display"  # -h/--help with --json/--quiet
    assert not re.search(r"<(str|list\[str\]|path)>", text)  # arguments by their names only
    assert "(default " not in text  # one default style: "(default: X)"
    assert not re.search(r"Usage: npmerge \S+ .*[{}]", text)
    if command == "warmup":
        return
    assert "Inputs" in panels
    if command not in ("info", "verify", "inspect", "assemble"):
        assert {"Output", "Resources", "Safety"} <= panels
        assert "--dry-run" in text and "--max-memory SIZE" in text
    if command not in ("info", "run", "verify", "assemble", "inspect", "warmup", "extract-lora"):
        from npmerge.methods import registry

        method = registry.get(command)
        assert ("Method" in panels) == bool(method.model_params or method.global_params)  # arcee-fusion has none


def test_help_shows_flags_as_flags():
    text = flat(cli("ties", "--help").stdout)
    assert re.search(r"--dry-run Run every check", text)  # no type between the flag and its help
    assert re.search(r"--force Replace", text)
    assert "--density -d FLOAT" in text and "<list[float]>" not in text
    assert "Usage: npmerge ties [OPTIONS] BASE MODEL..." in text
    assert "(default: --normalize)" in text and "(default: 1.0)" in text


# -- several values after one option -------------------------------------------------------------
def test_two_values_after_one_option_get_a_hint(tmp_path):
    proc = cli("ties", BASE, FA, FB, "--density", "0.5", "0.3", "-o", tmp_path / "o")
    assert proc.returncode == 2
    first, hint = proc.stderr.splitlines()[:2]
    assert first == "Error: model path '0.3' does not exist; it looks like a value meant for an option"
    assert hint == "Hint: --density takes one value: repeat it, once per model in order: --density 0.5 --density 0.3"
    proc = cli("ties", BASE, FA, FB, "-d", "0.5", "0.3", "0.2", "-o", tmp_path / "o")
    assert "Hint: -d takes one value: repeat it, once per model in order: -d 0.5 -d 0.3 -d 0.2" in proc.stderr
    proc = cli("ties", BASE, FA, "-d", "0.2", "--dry-run", "true", "-o", tmp_path / "o")
    assert proc.returncode == 2 and "Hint: --dry-run is a flag and takes no value: write just --dry-run" in proc.stderr
    proc = cli("ties", BASE, FA, "--lambda", "0.5", "0.3", "-o", tmp_path / "o")
    assert proc.returncode == 2 and "Hint: --lambda takes one value; '0.3' was read as a model" in proc.stderr
    proc = cli("ties", BASE, FA, FB, "-w", "-0.5", "-0.3", "-o", tmp_path / "o")  # click reads -0.3 as an option
    assert proc.returncode == 2 and "Hint: an option takes one value: repeat the option" in proc.stderr
    proc = cli("ties", BASE, FA, FB, "-w", "0.3", "-d", "0.5", "0.3", "-o", tmp_path / "o")  # the stray 0.3
    assert "Hint: -d takes one value: repeat it, once per model in order: -d 0.5 -d 0.3" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_a_model_directory_named_like_a_number_still_works(tmp_path):
    shutil.copytree(FB, tmp_path / "0.3")
    proc = cli("ties", BASE, FA, "0.3", "-d", "0.5", "-o", tmp_path / "o", "--dry-run", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [m["name"] for m in json.loads(proc.stdout)["models"]] == [str(FA), "0.3"]


# -- versions, python -m, completion -------------------------------------------------------------
def test_python_m_npmerge_version_prints_describe_versions():
    from npmerge.versions import describe_versions

    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == describe_versions()
    import numpy

    assert f"numpy {numpy.__version__}" in proc.stdout.splitlines()


def test_shell_completion_works():
    env = {"_NPMERGE_COMPLETE": "complete_bash", "COMP_WORDS": "npmerge ti", "COMP_CWORD": "1"}
    assert cli(env=env).stdout.split() == ["ties"]
    env.update(COMP_WORDS="npmerge ties --den", COMP_CWORD="2")
    assert cli(env=env).stdout.split() == ["--density"]
    script = cli(env={"_NPMERGE_COMPLETE": "source_bash"}).stdout
    assert "complete -o default -F _npmerge_completion npmerge" in script  # unknown words complete as files


# -- models by Hub id ----------------------------------------------------------------------------------
@pytest.fixture
def hub(tmp_path):
    """A Hugging Face cache with the tiny Llama base and two fine-tunes, and a working directory."""
    cache = tmp_path / "hf-cache"
    add_snapshot(cache, "meta/base", C1, model_files(BASE), refs=("main",))
    add_snapshot(cache, "team/ft-a", C2, model_files(FA), refs=("v1",))
    add_snapshot(cache, "team/ft-b", C3, model_files(FB), refs=("main",))
    work = tmp_path / "work"
    work.mkdir()
    return work, {"HF_HUB_CACHE": str(cache)}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_merge_of_hub_ids(hub, tmp_path):
    work, env = hub
    proc = cli("ties", "meta/base", "team/ft-a@v1", "team/ft-b", "-d", "0.2", "-o", "merged", cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    rows = [line for line in proc.stdout.splitlines() if line.startswith("│")]
    assert [r.split()[1] for r in rows] == ["team/ft-a@v1", "team/ft-b"]  # names, not snapshot hashes
    assert C2 not in proc.stdout and "snapshots" not in proc.stdout
    out = work / "merged"
    # the same bytes as merging the fixture directories by path: the ids resolved to the right snapshots
    by_path = tmp_path / "by-path"
    assert cli("ties", BASE, FA, FB, "-d", "0.2", "-o", by_path).returncode == 0
    assert (out / "model.safetensors").read_bytes() == (by_path / "model.safetensors").read_bytes()
    report = json.loads((out / "merge_report.json").read_text())
    assert report["base"] == {"name": "meta/base", "hub_id": "meta/base", "revision": None, "commit": C1}
    assert [{k: m[k] for k in ("name", "hub_id", "revision", "commit")} for m in report["models"]] == [
        {"name": "team/ft-a@v1", "hub_id": "team/ft-a", "revision": "v1", "commit": C2},
        {"name": "team/ft-b", "hub_id": "team/ft-b", "revision": None, "commit": C3}]
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == ["meta/base", "team/ft-a", "team/ft-b"]
    assert meta["base_model_relation"] == "merge" and "ties" in meta["tags"]
    assert f"https://huggingface.co/team/ft-a/tree/{C2}" in card
    for text in (card, json.dumps(report)):
        assert str(tmp_path) not in text and "snapshots" not in text
    dry = cli("ties", "meta/base", "team/ft-a@v1", "team/ft-b", "-d", "0.2", "-o", "again", "--dry-run", cwd=work,
              env=env)
    assert f"meta/base (commit {C1})" in dry.stdout and "team/ft-a@v1" in dry.stdout


def test_local_directory_shadowing_a_hub_id_is_noted(hub):
    work, env = hub
    shutil.copytree(FC, work / "team" / "ft-b")
    proc = cli("ties", "meta/base", "team/ft-a@v1", "team/ft-b", "-d", "0.2", "-o", "merged", cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("note: 'team/ft-b' is a local path and is used as such")
    report = json.loads((work / "merged" / "merge_report.json").read_text())
    assert report["models"][1]["name"] == "team/ft-b" and report["models"][1]["hub_id"] is None
    assert any("is a local path" in n for n in report["notes"])
    meta = _front_matter((work / "merged" / "README.md").read_text())
    assert meta["base_model"] == ["meta/base", "team/ft-a"]  # the local copy has no id


def test_missing_hub_id_names_it_and_the_fetch_command(hub, tmp_path):
    work, env = hub
    proc = cli("ties", "meta/base", "team/missing", "-d", "0.2", "-o", "merged", cwd=work, env=env)
    assert proc.returncode == 3
    assert proc.stderr.startswith("Error: 'team/missing' is not a local path, and Hub model team/missing is not in the "
                                  "Hugging Face cache")
    assert "Hint: fetch it with: hf download team/missing" in proc.stderr
    info = cli("info", "team/ft-a@v1", "--json", cwd=work, env=env)
    data = json.loads(info.stdout)
    assert (data["name"], data["commit"], data["tensors"]) == ("team/ft-a@v1", C2, len(tensors_of(FA)))


# -- no path of this machine in what is published -------------------------------------------------
def test_card_and_report_of_local_models_hold_no_absolute_path(tmp_path):
    """Models given by absolute paths, inside the working directory and outside it."""
    work = tmp_path / "work"
    shutil.copytree(BASE, work / "models" / "base")
    outside = tmp_path / "elsewhere" / "ft-a"
    shutil.copytree(FA, outside)
    proc = cli("ties", work / "models" / "base", outside, FB, "-d", "0.3", "-o", work / "merged", cwd=work,
               env={"COLUMNS": "300"})
    assert proc.returncode == 0, proc.stderr
    card = (work / "merged" / "README.md").read_text()
    report = (work / "merged" / "merge_report.json").read_text()
    for text in (card, report):
        for path in (tmp_path, work, outside, ROOT, FIXTURES, Path.home()):
            assert str(path) not in text, path
    names = [m["name"] for m in json.loads(report)["models"]]
    assert json.loads(report)["base"]["name"] == "models/base" and names == ["ft-a", "ft-b"]
    assert "| `ft-a` |" in card and "Base model: `base`" in card
    assert "base_model" not in _front_matter(card)
    # the summary names the models as given: relative inside the working directory, else as given
    rows = [line.split("│")[1].strip() for line in proc.stdout.splitlines() if line.startswith("│")]
    assert rows == [str(outside), str(FB)]
    plan = json.loads(cli("ties", work / "models" / "base", FB, "-o", "x", "--dry-run", "--json", cwd=work).stdout)
    assert plan["base"]["name"] == "models/base"


def test_readme_hub_example_runs_from_a_cache(tmp_path):
    """The README's merge by Hub id, run as written against a cache holding those ids."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Models by Hub id", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```console\n(.*?)```", section, flags=re.S).group(1)
    commands = [line[2:].split("  #")[0] for line in block.splitlines() if line.startswith("$ npmerge ")]
    assert commands and any("@" in c for c in commands)
    import shlex

    cache = tmp_path / "hf-cache"
    ids = [w for w in shlex.split(commands[-1])[2:] if "/" in w and not w.startswith("-")]
    for (repo, _, rev), src, commit in zip((i.partition("@") for i in ids), (BASE, FA, FB), (C1, C2, C3)):
        add_snapshot(cache, repo, commit, model_files(src), refs=(rev or "main",))
    for command in commands:
        proc = cli(*shlex.split(command)[1:], cwd=tmp_path, env={"HF_HUB_CACHE": str(cache), "COLUMNS": "200"})
        assert proc.returncode == 0, (command, proc.stderr)
        for model in ids[1:]:
            assert model in proc.stdout
    assert "base_model_relation: merge" in (tmp_path / "merged" / "README.md").read_text()
