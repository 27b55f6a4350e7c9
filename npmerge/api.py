"""The library entry points: plan a merge, execute it into an output directory.

Order of work: plan (every input validated; given the output directory, the writer's
preflight too: output location, free space, lock; nothing written) -> writer open (the
same checks again; with `resume`, the interrupted run's verified shards) -> engine (tensor data, shard by shard) -> companions, model card, recipe,
report -> input re-check and atomic rename. Any failure before the rename leaves
no output directory behind; after an interruption or output error the finished
shards stay in staging and the exception carries `resume_hint`.
"""

from __future__ import annotations

from pathlib import Path

from .constants import CARD_NAME, RECIPE_NAME, REPORT_NAME
from .engine import Engine, Progress
from .io.companions import write_companions
from .io.staging import sha256_file
from .io.writer import OutputWriter
from .plan import Plan, build_plan
from .recipe import Recipe
from .report import build_report, model_card, report_json



def plan_merge(recipe: Recipe, *, max_memory=None, threads=None, shard_size=None, out=None, force: bool = False,
               resume: bool = False) -> Plan:
    """Open and check every input and lay out the merge; with `out`, also run every check of
    the output location the real run makes before writing (`plan.output`), so a plan that
    builds is a merge that starts (what --dry-run shows). Notes from resolving the model
    references (a local path shadowing a Hub id, a download) come first in `plan.notes`."""
    plan = build_plan(recipe, max_memory=max_memory, threads=threads, shard_size=shard_size)
    try:
        plan.notes[:0] = [n for c in plan.inputs for n in (c.ref.notes if getattr(c, "ref", None) else ())]
        if out is not None:
            plan.output = _writer(plan, out, force, resume).preflight()
    except BaseException:
        plan.close()
        raise
    return plan


def _writer(plan: Plan, out, force: bool, resume: bool) -> OutputWriter:
    """The output writer of `plan`: inputs by their real paths (the output must stay apart
    from them) and the plan's fingerprint (what --resume must find unchanged)."""
    return OutputWriter(Path(out), plan.layout, inputs=[Path(c.path) for c in plan.inputs], force=force,
                        resume=resume, fingerprint=plan.fingerprint())


def execute(plan: Plan, out, *, force: bool = False, resume: bool = False,
            progress: Progress | None = None) -> dict:
    """Run a plan into directory `out`; return the report (also written as merge_report.json).

    `resume`: continue an interrupted run of the same plan into the same `out`.
    """
    writer = _writer(plan, out, force, resume)
    try:
        with writer:
            writer.open()
            engine = Engine(writer, threads=plan.threads, span=plan.span, allow_nonfinite=plan.allow_nonfinite,
                            progress=progress)
            stats = engine.run(plan)
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
    except BaseException as exc:
        if writer.kept:
            exc.resume_hint = writer.kept
        raise
    return report


def _config_dtype(plan: Plan) -> str:
    """The dtype config.json announces: the output dtype of the float tensors (most bytes wins)."""
    sizes: dict[str, int] = {}
    for job in plan.jobs:
        if not job.copy:
            sizes[job.out_dtype] = sizes.get(job.out_dtype, 0) + job.numel
    return max(sizes, key=sizes.get) if sizes else "F32"


def run_merge(recipe: Recipe, out, *, max_memory=None, threads=None, force=False, resume=False, progress=None,
              shard_size=None) -> dict:
    plan = plan_merge(recipe, max_memory=max_memory, threads=threads, shard_size=shard_size, out=out, force=force,
                      resume=resume)
    try:
        return execute(plan, out, force=force, resume=resume, progress=progress)
    finally:
        plan.close()
