"""`npmerge verify`: is a merge's output what its report, and its recipe, say it is?

Plain verify re-hashes every file `merge_report.json` lists (size and sha256) and names
the files that differ, are missing, or were added. `--recompute` goes further: it re-runs
`npmerge_recipe.yml` into a scratch directory (the inputs first checked against the
fingerprints the report recorded: a changed input is named, never silently used) and
compares every byte, the report included: the proof that a published merge is what its
recipe says. A merge is deterministic (docs/semantics.md), so any difference is real.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .constants import RECIPE_NAME, REPORT_NAME
from .errors import IncompatibleModels, InvalidCheckpoint, VerifyFailed, shown
from .io.staging import sha256_file

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Verdict:
    """What verify found: files matching the report, and every way the output departs from it."""

    out: Path
    matched: list[str] = field(default_factory=list)
    differ: list[str] = field(default_factory=list)  # "name: why"
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # in the folder, not part of the merge (not a failure)
    recomputed: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def one_file(self) -> bool:
        return is_one_file(self.out)

    @property
    def ok(self) -> bool:
        return not (self.differ or self.missing)

    def as_dict(self) -> dict:
        return {"output": str(self.out), "ok": self.ok, "one_file": self.one_file, "recomputed": self.recomputed,
                "matched": self.matched,
                "differ": self.differ, "missing": self.missing, "extra": self.extra, "notes": self.notes}

    def raise_if_failed(self) -> None:
        if self.ok:
            return
        what = "a re-run of its recipe" if self.recomputed or self.one_file else REPORT_NAME
        lines = [f"{name}: missing" for name in self.missing] + self.differ
        raise VerifyFailed(f"{self.out} differs from {what} in {len(lines)} file(s):\n" + "\n".join(
            f"  {line}" for line in lines), hint=None if self.recomputed else
            "a file changed after the merge (edited, truncated or replaced); re-download or re-run the merge")


def locate(ref: str) -> Path:
    """The output to verify: a local directory, or a Hub id whose snapshot is in the local cache."""
    from .io.hub import resolve_model

    path = Path(os.path.expanduser(ref))
    if path.exists():
        return path
    if ref.startswith(("/", ".", "~")) or ref.count("/") != 1:
        raise InvalidCheckpoint(f"'{ref}' does not exist", hint="give a merge's output directory, or the Hub id "
                                "org/name of a merge in the local Hugging Face cache")
    return Path(resolve_model(ref, allow_download=False).path)


def is_one_file(out: Path) -> bool:
    return out.is_file() and out.name.lower().endswith(".safetensors")


def load_report(out: Path) -> dict:
    """merge_report.json, checked to be a report npmerge wrote: its `files` must map plain
    file names to a size and a sha256 (an edited report naming '../x' must not make verify
    read outside the output). A one-file output: the summary in its header."""
    if is_one_file(out):
        return _header_summary(out)
    if not out.is_dir():
        what = "a file" if out.exists() else "missing"
        raise InvalidCheckpoint(f"'{out}' is not a merge output directory ({what})",
                                hint="give the directory a merge wrote (it holds merge_report.json), or a "
                                     "one-file merge (.safetensors)")
    path = out / REPORT_NAME
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidCheckpoint(f"'{out}' is not an npmerge output: it has no {REPORT_NAME}",
                                hint="verify checks a directory written by an npmerge merge") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidCheckpoint(f"{path} is not valid JSON ({exc})", hint="the report was edited or damaged; "
                                "re-download or re-run the merge") from None
    files = report.get("files") if isinstance(report, dict) else None
    if not isinstance(files, dict) or not files:
        raise InvalidCheckpoint(f"{path} is not an npmerge merge report (no 'files' table)")
    for name, entry in files.items():
        plain = name and name == os.path.basename(name) and name not in (".", "..", REPORT_NAME)
        good = (isinstance(entry, dict) and type(entry.get("size")) is int and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"]))
        if not plain or not good:
            raise InvalidCheckpoint(f"{path}: bad entry for file {shown(name)}: {shown(entry)}",
                                    hint="each file needs a plain name, an integer size and a 64-digit sha256")
    return report


def _header_summary(out: Path) -> dict:
    """A one-file output's header, validated: its recipe and summary (as `load_report` gives
    a directory's report, with the recipe text and the file's size limit added)."""
    from .io.safetensors import SafetensorsFile

    with SafetensorsFile(out) as f:
        meta = f.header.metadata or {}
    if "npmerge_recipe" not in meta or "merge_summary" not in meta:
        raise InvalidCheckpoint(f"'{out}' is not a one-file npmerge output: its header has no npmerge_recipe and "
                                "merge_summary", hint="verify checks what an npmerge merge wrote")
    try:
        summary = json.loads(meta["merge_summary"])
        limit = int(meta.get("npmerge_file_limit", ""))
    except ValueError as exc:
        raise InvalidCheckpoint(f"{out}: the merge summary in its header is damaged ({exc})") from None
    if not isinstance(summary, dict):
        raise InvalidCheckpoint(f"{out}: the merge summary in its header is not a JSON object")
    return {**summary, "output": {"shard_size": limit}, "recipe_text": meta["npmerge_recipe"]}


def check_files(out: Path, report: dict) -> Verdict:
    """Re-hash every file the report lists; name what differs, is missing, or was added.
    A one-file output holds no hash of itself: its header was validated (load_report) and
    its size is the header's; only --recompute can vouch for its bytes."""
    verdict = Verdict(out)
    if is_one_file(out):
        verdict.matched.append(out.name)
        return verdict
    for name, entry in sorted(report["files"].items()):
        path = out / name
        if not path.is_file():
            verdict.missing.append(name)
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            verdict.differ.append(f"{name}: {size:,} bytes, the report says {entry['size']:,}")
        elif sha256_file(path) != entry["sha256"]:
            verdict.differ.append(f"{name}: sha256 differs from the report's")
        else:
            verdict.matched.append(name)
    listed = set(report["files"]) | {REPORT_NAME}
    verdict.extra = sorted(p.name for p in out.iterdir() if p.name not in listed)
    return verdict


def recompute(out: Path, report: dict, *, scratch: Path | None = None, max_memory=None, threads=None,
              progress_factory=None) -> Verdict:
    """Re-run the output's recipe into a scratch directory and compare every file byte for byte."""
    recipe = _recipe_of(out, report)
    shard_size = (report.get("output") or {}).get("shard_size")
    verdict = Verdict(out, recomputed=True)
    made_by, running = report.get("npmerge_version"), __version__
    if made_by != running:
        verdict.notes.append(f"the merge was made by npmerge {made_by}, re-run with {running}: a difference may "
                             "come from the version")
    if shard_size is None:
        verdict.notes.append("the report does not record the shard size (an older npmerge): re-run with the default")
    where = Path(tempfile.mkdtemp(prefix=".npmerge-verify-", dir=scratch or _scratch_beside(out)))
    try:
        again = where / (out.name if is_one_file(out) else "merged")
        _rerun(recipe, report, again, verdict, shard_size=shard_size, max_memory=max_memory, threads=threads,
               progress_factory=progress_factory)
        (_compare_file if is_one_file(out) else _compare)(out, again, verdict)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    return verdict


def _recipe_of(out: Path, report: dict):
    from .recipe import Recipe

    if is_one_file(out):
        return Recipe.from_yaml(report["recipe_text"], f"the recipe in {out.name}'s header")
    path = out / RECIPE_NAME
    if not path.is_file():
        raise InvalidCheckpoint(f"'{out}' has no {RECIPE_NAME} to re-run", hint="--recompute needs the recipe file "
                                "a merge writes; plain `npmerge verify` still checks the files against the report")
    return Recipe.from_file(path)


def _rerun(recipe, report: dict, again: Path, verdict: Verdict, *, progress_factory, **options) -> None:
    """The merge again, into `again`, once its inputs match the report's fingerprints."""
    from . import api

    try:
        plan = api.plan_merge(recipe, out=again, **options)
    except InvalidCheckpoint as exc:
        if "does not exist" in exc.message:
            exc.hint = ("the recipe names the models as the merge was given them: paths relative to the directory "
                        "it ran in, or Hub ids; run verify --recompute from that directory")
        raise
    try:
        verdict.notes += _input_changes(plan, report)
        progress = progress_factory(plan) if progress_factory else contextlib.nullcontext(None)
        with progress as advance:
            api.execute(plan, again, progress=advance)
    finally:
        plan.close()


def _scratch_beside(out: Path) -> Path:
    """Beside the output (same filesystem, room for a model), unless that is the Hub cache:
    then the system temp directory."""
    from .io.hub import hub_cache_dir

    parent = out.resolve().parent
    cache = hub_cache_dir().resolve()
    inside_cache = parent == cache or cache in parent.parents
    return Path(tempfile.gettempdir()) if inside_cache or not os.access(parent, os.W_OK) else parent


def _input_changes(plan, report: dict) -> list[str]:
    """Refuse inputs that differ from the fingerprints the report recorded (size, and the
    sha256 of each safetensors header or small config file); notes when it recorded none."""
    from .report import input_records

    recorded = report.get("inputs")
    if recorded is None:
        return ["the report records no input fingerprints (an older npmerge): the inputs are used as found"]
    if not isinstance(recorded, list):
        raise InvalidCheckpoint(f"{REPORT_NAME}: 'inputs' is {shown(recorded)}, not a list of inputs",
                                hint="the report was edited or damaged")
    now = input_records(plan)
    changes = []
    for old, new in zip(recorded, now):
        if old != new:
            changes.append(_describe_change(old, new))
    if len(recorded) != len(now):
        changes.append(f"the recipe names {len(now)} inputs, the report {len(recorded)}")
    if changes:
        raise IncompatibleModels("the inputs changed since the merge:\n" + "\n".join(f"  {c}" for c in changes),
                                 hint="verify --recompute re-runs the merge from the same inputs; restore them "
                                      "(or the same Hub revisions) first")
    return []


def _describe_change(old: dict, new: dict) -> str:
    name = new.get("name")
    if old.get("name") != name:
        return f"input {shown(old.get('name'))} is now {shown(name)}"
    before = {f.get("file"): f for f in old.get("files", []) if isinstance(f, dict)}
    after = {f["file"]: f for f in new["files"]}
    parts = [f"{f} is gone" for f in before if f not in after] + [f"{f} is new" for f in after if f not in before]
    for f in sorted(set(before) & set(after)):
        if before[f] != after[f]:
            what = "size" if before[f].get("size") != after[f]["size"] else "content (header)"
            parts.append(f"{f}: {what} changed")
    return f"{name}: " + ("; ".join(parts) or "files differ")


def _compare_file(out: Path, again: Path, verdict: Verdict) -> None:
    a, b = out.stat().st_size, again.stat().st_size
    if a != b:
        verdict.differ.append(f"{out.name}: {a:,} bytes, the re-run wrote {b:,}")
    elif sha256_file(out) != sha256_file(again):
        verdict.differ.append(f"{out.name}: differs from the re-run's")
    else:
        verdict.matched.append(out.name)


def _compare(out: Path, again: Path, verdict: Verdict) -> None:
    """Every file of the re-run against the output, byte for byte (by sha256)."""
    made = {p.name for p in again.iterdir() if p.is_file()}
    have = {p.name for p in out.iterdir()}
    verdict.missing = sorted(made - have)
    verdict.extra = sorted(have - made)
    for name in sorted(made & have):
        a, b = out / name, again / name
        if a.stat().st_size != b.stat().st_size:
            verdict.differ.append(f"{name}: {a.stat().st_size:,} bytes, the re-run wrote {b.stat().st_size:,}")
        elif sha256_file(a) != sha256_file(b):
            verdict.differ.append(f"{name}: differs from the re-run's")
        else:
            verdict.matched.append(name)
