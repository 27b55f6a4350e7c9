"""The commands beside the merges: assemble, info, inspect, extract-lora, verify, warmup.

Thin, as cli.py: each parses its options, calls the module that does the work, renders.
`register(app)` adds them to the `npmerge` app in this order."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import List, Optional

import typer

from .cli_common import (DISPLAY, FORCE, INPUTS, JSON, MEM, METHOD, MODEL_REF, OUT_DTYPE, OUTPUT, QUIET, RESOURCES,
                         SAFETY, THREADS, Command, guard)
from .errors import RecipeError

_COMMANDS: list = []


def _command(*args, **kwargs):
    """Collect a command for register() (this module never sees the app it joins)."""
    def collect(fn):
        _COMMANDS.append((args, kwargs, fn))
        return fn
    return collect


def register(app: typer.Typer) -> None:
    for args, kwargs, fn in _COMMANDS:
        app.command(*args, **kwargs)(fn)


@_command(cls=Command, epilog="Example: npmerge assemble merged")
def assemble(
    out: Path = typer.Argument(..., metavar="OUT", help="The output directory the parts were run with (-o).",
                               rich_help_panel=INPUTS),
    max_memory: Optional[str] = MEM, threads: Optional[int] = THREADS, force: bool = FORCE, json_out: bool = JSON,
    quiet: bool = QUIET,
):
    """Put together a merge split into parts (--part I/N): check that every part is there and
    was made from the same plan, verify their shards, write the index, config, tokenizer,
    card and report, and rename the output into place (byte-identical to one machine)."""
    def body():
        from .parts import assemble as put_together

        started = time.perf_counter()
        report = put_together(out, force=force, max_memory=max_memory, threads=threads)
        if json_out:
            typer.echo(json.dumps(report, indent=2))
        elif not quiet:
            typer.echo(f"assembled {out}: {len(report['files'])} files in {time.perf_counter() - started:.1f} s")

    guard(body, json_out)


@_command(cls=Command, epilog="Example: npmerge info meta-llama/Llama-3.2-1B --tensors | less")
def info(
    path: str = typer.Argument(..., metavar="MODEL", help=f"The model: {MODEL_REF}; or a LoRA adapter directory.",
                               rich_help_panel=INPUTS),
    json_out: bool = typer.Option(False, "--json", help="Print the facts as JSON on stdout.", rich_help_panel=DISPLAY),
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor.", rich_help_panel=DISPLAY),
):
    """Show a checkpoint's tensors, dtypes, parameter count and shards (validates every header);
    for a LoRA adapter directory, the adapter: rank, alpha, scale, target modules, base."""
    def body():
        from .io.lora import LoraAdapter
        from .io.models import is_adapter, open_model

        if is_adapter(path):
            adapter = LoraAdapter(path)
            data = {"path": str(path), "adapter": adapter.summary()}
            adapter.close()
            if json_out:
                typer.echo(json.dumps(data, indent=2))
                return
            from . import render

            render.adapter_info(data)
            return
        ckpt = open_model(path)
        model = ckpt.ref
        dtypes: dict[str, int] = {}
        for ref in ckpt.tensors.values():
            dtypes[ref.info.dtype.name] = dtypes.get(ref.info.dtype.name, 0) + ref.info.numel
        data = {"path": str(path), **model.as_record(), "tensors": len(ckpt.tensors), "parameters": ckpt.total_params,
                "bytes": ckpt.total_bytes, "dtypes": dtypes,
                "shards": [Path(p).name for p in ckpt.files],
                "architecture": (ckpt.config or {}).get("architectures", [None])[0] if ckpt.config else None}
        if tensors or json_out:
            data["tensor_list"] = [{"name": n, "dtype": r.info.dtype.name, "shape": list(r.info.shape),
                                    "file": Path(r.file.path).name} for n, r in ckpt.tensors.items()]
        ckpt.close()
        from . import render

        render.notes(model.notes)
        if json_out:
            typer.echo(json.dumps(data, indent=2))
            return
        render.info(data, tensors)

    guard(body, json_out)


@_command("inspect", cls=Command, epilog="Example: npmerge inspect BASE FT1 FT2 --plot fine-tunes.png")
def inspect_command(
    base: str = typer.Argument(..., metavar="BASE", help=f"Base model: {MODEL_REF}.", rich_help_panel=INPUTS),
    models: List[str] = typer.Argument(..., metavar="MODEL...", help="Fine-tuned models (two or more), each a "
                                       "directory, .safetensors file or Hub id.", rich_help_panel=INPUTS),
    density: Optional[List[float]] = typer.Option(None, "--density", "-d", metavar="FLOAT", help="Densities at "
                                                  "which to count TIES's sign conflicts (repeatable; default: "
                                                  "0.1, 0.2, ..., 1.0).", rich_help_panel=METHOD),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE", help="Also draw FILE.png or FILE.svg: cosine "
                                        "similarity by layer and pair, sign conflicts against density (needs "
                                        "npmerge[plot]: matplotlib).", rich_help_panel=OUTPUT),
    max_memory: Optional[str] = MEM, threads: Optional[int] = THREADS, json_out: bool = JSON, quiet: bool = QUIET,
):
    """How fine-tunes relate, per layer: task-vector norms, pairwise cosine similarity, sign
    conflicts (overall and, per model, against the sign election at each density), and what a
    merge of them would refuse or note. Streamed in bounded memory."""
    def body():
        from . import render
        from .inspection import DENSITIES, inspect_models

        densities = tuple(sorted(set(density))) if density else DENSITIES
        if any(not 0 < d <= 1 for d in densities):
            raise RecipeError(f"--density must be in (0, 1], got {[d for d in densities if not 0 < d <= 1][0]}")
        if plot is not None:
            render.check_plot_target(plot)
        with contextlib.ExitStack() as bars:  # the bar's total is known once the models are planned
            data = inspect_models(base, list(models), densities=densities, max_memory=max_memory, threads=threads,
                                  progress=lambda total: bars.enter_context(
                                      render.progress_bar("inspect", total, disable=quiet or json_out)))
        if plot is not None:
            render.inspection_plot(data, plot)
        if json_out:
            typer.echo(json.dumps(data, indent=2))
        elif not quiet:
            render.notes(data["notes"])
            render.inspection(data)

    guard(body, json_out)


@_command("extract-lora", cls=Command, epilog="Example: npmerge extract-lora meta-llama/Llama-3.2-1B ./ft "
             "--rank 64 -o ./ft-lora   # then: npmerge task-arithmetic BASE BASE+./ft-lora -o OUT")
def extract_lora(
    base: str = typer.Argument(..., metavar="BASE", help=f"Base model: {MODEL_REF}.", rich_help_panel=INPUTS),
    ft: str = typer.Argument(..., metavar="FT", help="The fine-tune of BASE: a directory, .safetensors file, Hub id "
                             "or MODEL+ADAPTER.", rich_help_panel=INPUTS),
    out: Path = typer.Option(..., "-o", "--out", metavar="OUT", help="Output PEFT adapter directory (created "
                             "atomically).", rich_help_panel=OUTPUT),
    rank: int = typer.Option(128, "--rank", "-r", metavar="INT", help="Largest rank of a module's factors (default: "
                             "128, mergekit's).", show_default=False, rich_help_panel=METHOD),
    sv_epsilon: float = typer.Option(0.0, "--sv-epsilon", metavar="FLOAT", help="Drop singular values at or below "
                                     "this (default: 0).", show_default=False,
                                     rich_help_panel=METHOD),
    rank_energy: Optional[float] = typer.Option(None, "--rank-energy", metavar="F", help="Per module, the smallest "
                                                "rank keeping fraction F (0 < F <= 1) of the change's squared "
                                                "Frobenius norm, at most --rank (written as rank_pattern).",
                                                rich_help_panel=METHOD),
    distribute_scale: bool = typer.Option(True, "--distribute-scale/--no-distribute-scale", help="sqrt(s) on both "
                                          "factors, or s on lora_B (default: --distribute-scale).", show_default=False,
                                          rich_help_panel=METHOD),
    include: Optional[List[str]] = typer.Option(None, "--include", "-i", metavar="REGEX", help="Only modules whose "
                                                "name matches (re.search; repeatable).", rich_help_panel=METHOD),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", "-e", metavar="REGEX", help="Leave out modules "
                                                "whose name matches (re.search; repeatable).", rich_help_panel=METHOD),
    embed_lora: bool = typer.Option(False, "--embed-lora", help="LoRA on the input embedding and the head too "
                                    "(default: saved whole in modules_to_save when changed).", rich_help_panel=METHOD),
    skip_undecomposable: bool = typer.Option(False, "--skip-undecomposable", help="Leave out changed norms and other "
                                             "tensors no LoRA can hold (default: saved whole).",
                                             rich_help_panel=METHOD),
    out_dtype: Optional[str] = OUT_DTYPE, max_memory: Optional[str] = MEM, threads: Optional[int] = THREADS,
    dry_run: bool = typer.Option(False, "--dry-run", help="Run every check the extraction makes (inputs, output "
                                 "location, free space, memory per module) and print the plan on stdout; write "
                                 "nothing.", rich_help_panel=SAFETY),
    force: bool = FORCE,
    json_out: bool = typer.Option(False, "--json", help="Print the report (or the error) as JSON on stdout.",
                                  rich_help_panel=DISPLAY),
    quiet: bool = QUIET,
):
    """Extract a LoRA adapter from a fine-tune: per module the best rank-r approximation of
    FT - BASE (exact truncated SVD), as a PEFT adapter directory npmerge and PEFT load."""
    def body():
        from . import render
        from .extract import Options, plan_extract
        from .extract_run import execute

        started = time.perf_counter()
        options = Options(rank=rank, sv_epsilon=sv_epsilon, rank_energy=rank_energy,
                          distribute_scale=distribute_scale, include=tuple(include or ()),
                          exclude=tuple(exclude or ()), embed_lora=embed_lora,
                          skip_undecomposable=skip_undecomposable, out_dtype=out_dtype)
        plan = plan_extract(base, ft, options, max_memory=max_memory, threads=threads, out=out, force=force)
        try:
            if not quiet:
                render.notes(plan.notes)
            if dry_run:
                data = plan.as_dict(out)
                if json_out:
                    typer.echo(json.dumps(data, indent=2))
                else:
                    render.extract_plan(data)
                return
            with render.progress_bar("extract-lora", plan.total_work, disable=quiet or json_out) as advance:
                report = execute(plan, out, force=force, progress=advance)
        finally:
            plan.close()
        if json_out:
            typer.echo(json.dumps(report, indent=2))
        elif not quiet:
            render.extract_summary(report, out, time.perf_counter() - started)

    guard(body, json_out)


@_command(cls=Command, epilog="Example: npmerge verify merged --recompute")
def verify(
    out: str = typer.Argument(..., metavar="OUT", help="A merge's output directory, or the Hub id of a merge in the "
                              "local Hugging Face cache.", rich_help_panel=INPUTS),
    recompute: bool = typer.Option(False, "--recompute", help="Also re-run the output's npmerge_recipe.yml (its "
                                   "inputs checked against the fingerprints the report recorded) into a scratch "
                                   "directory and compare every byte.", rich_help_panel=METHOD),
    scratch: Optional[Path] = typer.Option(None, "--scratch", metavar="DIR", help="Where --recompute writes its "
                                           "merge, removed afterwards (default: beside OUT; the temp directory "
                                           "for a Hub id).", rich_help_panel=RESOURCES),
    max_memory: Optional[str] = MEM, threads: Optional[int] = THREADS, json_out: bool = JSON, quiet: bool = QUIET,
):
    """Check a merge's output against its merge_report.json (size and sha256 of every file) and,
    with --recompute, against a re-run of its recipe. Exit 0 when all matches, 6 when a file
    differs or is missing."""
    def body():
        from . import render, verify as check

        where = check.locate(out)
        report = check.load_report(where)
        if recompute:
            verdict = check.recompute(where, report, scratch=scratch, max_memory=max_memory, threads=threads,
                                      progress_factory=lambda plan: render.progress(plan, disable=quiet or json_out))
        else:
            verdict = check.check_files(where, report)
        if json_out:
            typer.echo(json.dumps(verdict.as_dict(), indent=2))
        elif not quiet:
            render.notes(verdict.notes)
            render.verdict(verdict)
        verdict.raise_if_failed()

    guard(body, json_out, result_printed=True)


@_command(cls=Command, epilog="Example: npmerge warmup --dtype bfloat16 --method ties")
def warmup(
    dtype: Optional[List[str]] = typer.Option(
        None, "--dtype", metavar="DTYPE", help="Storage dtype of the checkpoints to merge (repeatable; default: "
        "bfloat16, float16, float32).", rich_help_panel="Kernels"),
    method: Optional[List[str]] = typer.Option(None, "--method", metavar="METHOD", help="A merge method (repeatable; "
                                               "default: all).", rich_help_panel="Kernels"),
):
    """Compile and cache the kernels now (e.g. while building a container image)."""
    def body():
        from . import kernels, render
        from .dtypes import parse_user_dtype
        from .methods import registry
        from .warmup import DEFAULT_DTYPES, compile_kernels

        codes = tuple(dict.fromkeys(parse_user_dtype(d) for d in dtype)) if dtype else DEFAULT_DTYPES
        methods = [registry.get(m).name for m in method] if method else None
        seconds = compile_kernels(codes, methods)
        where = kernels.ensure_cache_dir() or "memory only (no writable cache directory)"
        render.stderr().print(f"kernels for {', '.join(codes)} compiled in {seconds:.1f} s, cached in {where}")

    guard(body, False)
