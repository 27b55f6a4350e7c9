"""A merge split into parts: `--part I/N` runs, then `npmerge assemble OUT`.

Every part plans the whole merge (the same plan on every node: same inputs, same recipe)
and writes only its own whole shards (io/shards.py part_shards) into its own staging
directory `.<OUT>.npmerge-parts/part-I-of-N/` on a filesystem every node sees; it ends
with `part.json`: the plan's fingerprint, the recipe, and each shard's size, sha256 and
statistics. Parts run in any order, at once, on any machine; a killed one is rerun
with --resume like any merge.

`assemble` re-plans from the recorded recipe, checks that every part is there and was
made from that very plan, re-hashes each shard, moves the shards into the output's
staging directory and finishes as a one-machine merge does (index, config, tokenizer,
card, report with the statistics in the same order), then renames it into place: the
output is byte-identical to a one-machine run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .errors import IncompatibleModels, InvalidCheckpoint, RecipeError, shown
from .io import staging as st

MAX_PARTS = 9999
_NAME = re.compile(r"part-(\d{4})-of-(\d{4})")


def parse_part(text: str) -> tuple[int, int]:
    """`--part I/N` (1 <= I <= N)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)) <= MAX_PARTS:
        raise RecipeError(f"--part must be I/N with 1 <= I <= N <= {MAX_PARTS}, got {shown(text)}",
                          hint="e.g. --part 3/8: the third of eight parts")
    return int(m.group(1)), int(m.group(2))


def finished_parts(out: Path) -> dict[tuple[int, int], dict]:
    """The finished parts beside OUT: (I, N) -> part.json."""
    found = {}
    where = st.parts_dir(st.resolve_out(out))
    if not where.is_dir():
        return found
    for d in sorted(where.iterdir()):
        m = _NAME.fullmatch(d.name)
        if m is None or not (d / st.PART_NAME).is_file():
            continue
        try:
            record = json.loads((d / st.PART_NAME).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidCheckpoint(f"{d / st.PART_NAME} is damaged ({exc})",
                                    hint=f"rerun that part: delete {d} and run it again") from None
        found[int(m.group(1)), int(m.group(2))] = record
    return found


def assemble(out, *, force: bool = False, max_memory=None, threads=None) -> dict:
    """Check the parts, put their shards together and finish the output; return its report."""
    from . import api
    from .recipe import Recipe

    out = st.resolve_out(out)
    parts = finished_parts(out)
    if not parts:
        raise RecipeError(f"no finished part of {out} found in {st.parts_dir(out)}",
                          hint="run the merge with --part I/N for I = 1..N first (the same -o), then assemble")
    counts = sorted({n for _, n in parts})
    if len(counts) > 1:
        raise IncompatibleModels(f"the parts beside {out} belong to different splits (N = {', '.join(map(str, counts))})",
                                 hint=f"keep the parts of one split in {st.parts_dir(out)}; delete the others")
    n = counts[0]
    missing = [i for i in range(1, n + 1) if (i, n) not in parts]
    if missing:
        which = ", ".join(f"{i}/{n}" for i in missing)
        raise IncompatibleModels(f"{len(missing)} of {n} parts of {out} are missing or unfinished: {which}",
                                 hint=f"run the merge command with --part {missing[0]}/{n} (and each other missing "
                                      "part; add --resume to continue an interrupted one), then assemble again")
    first = parts[1, n]
    recipe = Recipe.from_yaml(first["recipe"], f"the recipe of part 1/{n}")
    plan = api.plan_merge(recipe, max_memory=max_memory, threads=threads, shard_size=first.get("shard_size"),
                          out=out, force=force)
    try:
        writer = api.writer_for(plan, out, force, False, adopt=True)
        _check_plans(parts, n, writer.fingerprint)
        shard_of = _check_shards(out, parts, n, plan.layout, threads)
        stats: dict[str, dict] = {}
        with writer:
            writer.open()
            for i in range(len(plan.layout.shards)):
                (p, record) = shard_of[i]
                writer.adopt_shard(i, st.part_dir(out, p, n) / record["file"], record)
                stats.update(record["stats"])  # shard by shard, as one machine's engine fills them
            report = api.finish_directory(plan, writer, stats)
    finally:
        plan.close()
    shutil.rmtree(st.parts_dir(out), ignore_errors=True)
    return report


def _check_plans(parts: dict, n: int, fingerprint: dict) -> None:
    """Every part made from the plan this machine makes now (recipe, inputs, layout)."""
    wrong = []
    for i in range(1, n + 1):
        made = parts[i, n].get("fingerprint")
        if made != fingerprint:
            diffs = st.plan_differences(made, fingerprint) if isinstance(made, dict) else ["no fingerprint"]
            wrong.append(f"part {i}/{n}: " + ("; ".join(diffs) or "another plan"))
    if wrong:
        raise IncompatibleModels("parts made from another plan than this one:\n" + "\n".join(f"  {w}" for w in wrong),
                                 hint="rerun those parts with the same command and inputs (delete their directories "
                                      "first), then assemble again")


def _check_shards(out: Path, parts: dict, n: int, layout, threads: int | None) -> dict[int, tuple[int, dict]]:
    """Shard index -> (part, record): each shard recorded by exactly the part that owns it,
    its file there with the recorded size and sha256 (hashed on `threads` threads: hashlib
    releases the GIL, so a large output is hashed at the disk's speed, not one core's)."""
    from concurrent.futures import ThreadPoolExecutor

    from .io.shards import part_shards

    shard_of = {}
    for p in range(1, n + 1):
        records = {r.get("shard"): r for r in parts[p, n].get("shards", []) if isinstance(r, dict)}
        for i in part_shards(layout, p, n):
            rec = records.get(i)
            path = st.part_dir(out, p, n) / (rec or {}).get("file", layout.shards[i].filename)
            if rec is None or not isinstance(rec.get("stats"), dict) or not path.is_file():
                raise IncompatibleModels(f"part {p}/{n} lacks shard {layout.shards[i].filename}",
                                         hint=f"rerun part {p}/{n} (delete {path.parent} first)")
            shard_of[i] = (p, rec)
    paths = {i: st.part_dir(out, p, n) / rec["file"] for i, (p, rec) in shard_of.items()}
    with ThreadPoolExecutor(max(1, threads or os.cpu_count() or 1)) as pool:
        digests = dict(zip(paths, pool.map(lambda i: (paths[i].stat().st_size, st.sha256_file(paths[i])), paths)))
    for i, (p, rec) in sorted(shard_of.items()):
        if digests[i] != (rec.get("size"), rec.get("sha256")):
            raise IncompatibleModels(f"part {p}/{n}: {paths[i].name} no longer matches its recorded size and sha256 "
                                     "(changed after the part finished)",
                                     hint=f"rerun part {p}/{n} (delete {paths[i].parent} first)")
    return shard_of
