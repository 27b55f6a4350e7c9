"""The library entry points: plan a merge, execute it into an output directory.

Order of work: plan (every input validated; given the output directory, the writer's
preflight too: output location, free space, lock; nothing written) -> writer open (the
same checks again; with `resume`, the interrupted run's verified shards) -> engine (tensor data, shard by shard) -> companions, model card, recipe,
report -> input re-check and atomic rename. Any failure before the rename leaves
no output directory behind; after an interruption or output error the finished
shards stay in staging and the exception carries `resume_hint`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .constants import CARD_NAME, RECIPE_NAME, REPORT_NAME
from .engine import Engine, Progress
from .io.companions import write_companions
from .errors import RecipeError
from .io.shards import with_metadata
from .io.staging import sha256_file
from .io.writer import OutputWriter
from .plan import Plan, build_plan
from .recipe import Recipe
from .report import build_report, model_card, report_json



def plan_merge(recipe: Recipe, *, max_memory=None, threads=None, shard_size=None, out=None, force: bool = False,
               resume: bool = False, part: tuple[int, int] | None = None) -> Plan:
    """Open and check every input and lay out the merge; with `out`, also run every check of
    the output location the real run makes before writing (`plan.output`), so a plan that
    builds is a merge that starts (what --dry-run shows). Notes from resolving the model
    references (a local path shadowing a Hub id, a download) come first in `plan.notes`."""
    one_file = Path(out).name if out is not None and is_one_file(out) else None
    plan = build_plan(recipe, max_memory=max_memory, threads=threads, shard_size=shard_size, one_file=one_file)
    try:
        plan.notes[:0] = [n for c in plan.inputs for n in (c.ref.notes if getattr(c, "ref", None) else ())]
        if part is not None and plan.one_file:
            raise RecipeError("--part splits a model directory by shards; a one-file output is one shard",
                              hint="give -o a directory to split the merge into parts")
        if out is not None:
            plan.output = writer_for(plan, out, force, resume, part).preflight()
    except BaseException:
        plan.close()
        raise
    return plan


def is_one_file(out) -> bool:
    """`-o NAME.safetensors` asks for one file (what diffusion tools load), not a directory."""
    return str(out).lower().endswith(".safetensors")


def writer_for(plan: Plan, out, force: bool, resume: bool, part: tuple[int, int] | None = None,
            adopt: bool = False) -> OutputWriter:
    """The output writer of `plan`: inputs by their real paths (the output must stay apart
    from them) and the plan's fingerprint (what --resume and assemble must find unchanged)."""
    if plan.one_file != is_one_file(out):
        raise RecipeError(f"the plan was made for {'one file' if plan.one_file else 'a directory'}, not for {out}")
    return OutputWriter(Path(out), plan.layout, inputs=[Path(c.path) for c in plan.inputs], force=force,
                        resume=resume, fingerprint=plan.fingerprint(), one_file=plan.one_file, part=part,
                        adopt=adopt, final_header=_summary_header(plan) if plan.one_file else None)


def execute(plan: Plan, out, *, force: bool = False, resume: bool = False,
            progress: Progress | None = None, part: tuple[int, int] | None = None) -> dict:
    """Run a plan into directory `out`; return the report (also written as merge_report.json).

    `resume`: continue an interrupted run of the same plan into the same `out`.
    `part` (I, N): write only part I of N's shards, into its staging directory beside `out`,
    and return its record (npmerge/parts.py assembles the parts).
    """
    writer = writer_for(plan, out, force, resume, part)
    try:
        with writer:
            writer.open()
            engine = Engine(writer, threads=plan.threads, span=plan.span, allow_nonfinite=plan.allow_nonfinite,
                            progress=progress)
            stats = engine.run(plan)
            if part is not None:
                where = writer.finish_part({"part": part[0], "parts": part[1], "recipe": plan.recipe.to_yaml(),
                                            "shard_size": plan.layout.shard_bytes})
                return {"part": part, "staging": str(where), "files": writer.shard_files}
            if plan.one_file:  # its header, summary included, was final with its data (writer_for)
                writer.commit()
                return {**build_report(plan, stats, {}), "files": writer.shard_files}
            return finish_directory(plan, writer, stats)
    except BaseException as exc:
        if writer.kept:
            exc.resume_hint = writer.kept
        raise


def finish_directory(plan: Plan, writer: OutputWriter, stats: dict) -> dict:
    """Once every shard is written: companions, recipe, card and the report, then the commit."""
    write_companions(writer, plan.reference.root, _config_dtype(plan), plan.config_updates, plan.tokenizer_files)
    recipe_yaml = plan.recipe.to_yaml()
    writer.add_bytes(RECIPE_NAME, recipe_yaml.encode())
    writer.add_bytes(CARD_NAME, model_card(plan, recipe_yaml).encode())
    writer.finish_shards()
    shards = writer.shard_files
    files = {p.name: shards.get(p.name) or {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(writer.staging_dir.iterdir())
             if p.is_file() and p.name not in writer.private_files}
    report = build_report(plan, stats, files)
    writer.add_bytes(REPORT_NAME, report_json(report))
    writer.commit()
    return report


def _summary_header(plan: Plan):
    """A one-file output's final header: the merge's summary (the report without its
    per-tensor tables) joins the recipe, in the room kept for it (io/shards.py)."""
    shard = plan.layout.shards[0]

    def header(stats: dict) -> bytes:
        summary = {k: v for k, v in build_report(plan, stats, {}).items()
                   if k not in ("tensors", "tensor_parameters", "files")}
        prefix = with_metadata(shard, {"merge_summary": json.dumps(summary, separators=(",", ":"))})
        if prefix is None:  # a very long list of notes: the summary without them
            summary["notes"] = [f"{len(summary['notes'])} notes (too long for the header; --json shows them)"]
            prefix = with_metadata(shard, {"merge_summary": json.dumps(summary, separators=(",", ":"))})
        return prefix

    return header


def _config_dtype(plan: Plan) -> str:
    """The dtype config.json announces: the output dtype of the float tensors (most bytes wins)."""
    sizes: dict[str, int] = {}
    for job in plan.jobs:
        if not job.copy:
            sizes[job.out_dtype] = sizes.get(job.out_dtype, 0) + job.numel
    return max(sizes, key=sizes.get) if sizes else "F32"


def run_merge(recipe: Recipe, out, *, max_memory=None, threads=None, force=False, resume=False, progress=None,
              shard_size=None, part: tuple[int, int] | None = None) -> dict:
    plan = plan_merge(recipe, max_memory=max_memory, threads=threads, shard_size=shard_size, out=out, force=force,
                      resume=resume, part=part)
    try:
        return execute(plan, out, force=force, resume=resume, progress=progress, part=part)
    finally:
        plan.close()
