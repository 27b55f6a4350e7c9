"""The `npmerge` command line: parse flags into a Recipe, call the API, render.

Thin on purpose: no business logic here. Results go to stdout (`info`, the `--dry-run`
plan, the final summary, `--json`), progress and diagnostics (notes, `Error:`/`Hint:`)
to stderr. Errors, usage errors included, print `Error:` and `Hint:` lines and exit with
the error's code (docs/format-and-safety.md §4); Ctrl-C exits 130, SIGTERM 143 and SIGHUP 129,
never leaving an output directory (finished shards stay in staging for --resume).
NPMERGE_DEBUG=1 shows tracebacks. Models are named by path or Hub id (io/hub.py).
"""

from __future__ import annotations

import os

# npmerge does no linear algebra (BLAS sums in an order of its own), but numba imports
# SciPy's BLAS and NumPy starts OpenBLAS's thread pool: idle pools spin beside the merge's
# threads on a small machine. One thread each, unless the user chose otherwise.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import inspect  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from enum import Enum  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import List, Optional  # noqa: E402

import typer  # noqa: E402
from typer.core import TyperCommand, TyperGroup  # noqa: E402

from .errors import NpmergeError, RecipeError, VerifyFailed  # noqa: E402

EXIT_CODES = ((0, "done"), (2, "usage or recipe error"), (3, "invalid input file"), (4, "incompatible models"),
              (5, "output not writable, disk full or locked"),
              (6, "verify: the output differs from its report or recipe"), (130, "interrupted (Ctrl-C)"),
              (143, "terminated (SIGTERM)"), (129, "hung up (SIGHUP)"),
              (1, "a bug in npmerge (NPMERGE_DEBUG=1 shows the traceback)"))
MODEL_REF = ("a model directory, a .safetensors file, or a Hub id (org/name or org/name@revision) from the Hugging "
             "Face cache")


class _FlagsAsFlags:
    """Help a user reads: a flag without a type (Typer 0.2x prints `<bool>`, which invites
    `--dry-run true`), arguments by their names only (`BASE MODEL...`, not `{BASE}` typed
    `<str>`), and -h/--help in the Display panel instead of an "Options" panel of its own."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
            if param.param_type_name == "argument":
                usage = param.metavar or param.name.upper()
                usage += "..." if param.nargs != 1 and not usage.endswith("...") else ""
                usage = usage if param.required else f"[{usage}]"
                param.display_type_rich = lambda ctx: None
                param._usage_display_name = lambda usage=usage: usage
            if param.name == "help" and not isinstance(self, TyperGroup):  # the root: Options (--version, --help)
                param.rich_help_panel = _DISPLAY
        return params


class _Command(_FlagsAsFlags, TyperCommand):
    pass


class _Group(_FlagsAsFlags, TyperGroup):
    pass


app = typer.Typer(
    name="npmerge",
    cls=_Group,
    help="Merge fine-tuned safetensors checkpoints (TIES and its family) exactly, "
         "in bounded memory, on CPU. No PyTorch.",
    epilog=f"Models are {MODEL_REF}. Example: npmerge ties BASE FT1 FT2 --density 0.2 -o OUT\n\n"
           "Exit codes: " + "; ".join(f"{code} {what}" for code, what in EXIT_CODES) + ".",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        from .versions import describe_versions

        typer.echo(describe_versions())
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the versions of npmerge, Python and its libraries, and exit.")):
    """Merge fine-tuned safetensors checkpoints exactly, in bounded memory, without PyTorch."""


# -- shared options -------------------------------------------------------------------
# One panel per purpose; defaults written one way: "(default: X)".
_METHOD, _INPUTS, _OUTPUT, _RESOURCES, _SAFETY, _DISPLAY = ("Method", "Inputs", "Output", "Resources", "Safety",
                                                            "Display")
OUT = typer.Option(..., "-o", "--out", metavar="OUT", help="Output model directory, or one file when OUT ends in "
                   ".safetensors (diffusion tools); created atomically.", rich_help_panel=_OUTPUT)
OUT_DTYPE = typer.Option(None, "--out-dtype", metavar="DTYPE",
                         help="Output dtype: bfloat16, float16, float32 (default: the base's).", rich_help_panel=_OUTPUT)
SHARD = typer.Option(None, "--shard-size", metavar="SIZE", help="Max tensor bytes per output shard, e.g. 5GB "
                     "(default: 5GB; for one .safetensors file its limit, default: 50GB).", rich_help_panel=_OUTPUT)
MEM = typer.Option(None, "--max-memory", metavar="SIZE", help="Working-memory budget, e.g. 512MiB, 4GiB (default: 1/4 "
                   "of available RAM, at most 4GiB).", rich_help_panel=_RESOURCES)
THREADS = typer.Option(None, "--threads", metavar="N", help="Compute threads (default: all cores).",
                       rich_help_panel=_RESOURCES)
DRY = typer.Option(False, "--dry-run", help="Run every check the merge makes (inputs, output location, free space, "
                   "lock) and print the plan on stdout; write nothing.", rich_help_panel=_SAFETY)
JSON = typer.Option(False, "--json", help="Print the merge report (or the plan, or the error) as JSON on stdout.",
                    rich_help_panel=_DISPLAY)
FORCE = typer.Option(False, "--force", help="Replace an existing output directory.", rich_help_panel=_SAFETY)
NONFINITE = typer.Option(False, "--allow-nonfinite", help="Merge even if a weight is NaN or Inf.",
                         rich_help_panel=_SAFETY)
QUIET = typer.Option(False, "-q", "--quiet", help="No progress bar, notes or summary.", rich_help_panel=_DISPLAY)
RESUME = typer.Option(False, "--resume", help="Continue an interrupted merge into the same -o: its finished shards "
                      "are verified (sha256) and kept. Refused if the recipe or inputs changed.", rich_help_panel=_SAFETY)
TOKENIZER = typer.Option(None, "--tokenizer-source", metavar="SOURCE", help="Map embedding and head rows by token "
                         "to an output vocabulary: base (the base's), union (every model's tokens) or one of the "
                         "models; its tokenizer files are written (default: none, rows merged by position, the base's "
                         "tokenizer copied).", rich_help_panel=_OUTPUT)
PART = typer.Option(None, "--part", metavar="I/N", help="Merge only part I of N (whole output shards, balanced by "
                   "bytes) into a staging directory beside -o, on a filesystem every node sees; then `npmerge "
                   "assemble OUT` (see README 'Beyond one machine').", rich_help_panel=_RESOURCES)
RAY = typer.Option(None, "--ray", metavar="ADDRESS", help="Run the merge as parts on Ray and assemble it: 'local' "
                  "(a Ray started here), 'auto' (the cluster `ray start` made) or a cluster address; --threads CPUs "
                  "per part (default: 1), one part per share of the cluster's CPUs, at most one per shard; needs "
                  "npmerge[ray].", rich_help_panel=_RESOURCES)
_SHARED = dict(tokenizer_source=(Optional[str], TOKENIZER),
               out_dtype=(Optional[str], OUT_DTYPE), shard_size=(Optional[str], SHARD), max_memory=(Optional[str], MEM),
               threads=(Optional[int], THREADS), dry_run=(bool, DRY), json_out=(bool, JSON), force=(bool, FORCE),
               allow_nonfinite=(bool, NONFINITE), quiet=(bool, QUIET), resume=(bool, RESUME), part=(Optional[str], PART),
               ray=(Optional[str], RAY))
_SHORT = {"weight": "-w", "density": "-d", "t": "-t"}


# -- one subcommand per registered method ----------------------------------------------
def _option(param, per_model: bool):
    """The typer annotation and Option of one method parameter."""
    default = ("not given" if param.optional else "required") if param.default is None else (
        f"default: {param.cli_flag if param.default else '--no-' + param.cli_flag[2:]}" if param.kind == "bool"
        else f"default: {param.default}")
    flags = [param.cli_flag] + ([_SHORT[param.name]] if param.name in _SHORT else [])
    panel = _METHOD
    if per_model:
        return (Optional[List[float]], typer.Option(
            None, *flags, metavar="FLOAT", help=f"{param.help[0].upper()}{param.help[1:]}; one value per option: "
            f"repeat it once per model, in order ({flags[-1]} 0.5 {flags[-1]} 0.3), or give it once for all "
            f"({default}).", rich_help_panel=panel))
    if param.kind == "bool":
        name = param.cli_flag[2:]
        return Optional[bool], typer.Option(None, f"--{name}/--no-{name}", help=f"{param.help[0].upper()}"
                                            f"{param.help[1:]} ({default}).", rich_help_panel=panel)
    if param.kind == "choice":
        choices = Enum(param.name.title(), {str(o): str(o) for o in param.check.options}, type=str)
        return Optional[choices], typer.Option(None, *flags, help=f"{param.help[0].upper()}{param.help[1:]} "
                                               f"({default}).", rich_help_panel=panel)
    typ = Optional[int] if param.kind == "int" else Optional[float]
    return typ, typer.Option(None, *flags, metavar="INT" if param.kind == "int" else "FLOAT",
                             help=f"{param.help[0].upper()}{param.help[1:]} ({default}).", rich_help_panel=panel)


def _add_method_command(method) -> None:
    """`npmerge <method> [BASE] MODELS... -o OUT [options]`, generated from the registry entry."""
    P = inspect.Parameter
    sig: list = []
    if method.base == "required":
        sig.append(P("base", P.POSITIONAL_OR_KEYWORD, annotation=str, default=typer.Argument(
            ..., metavar="BASE", help=f"Base model: {MODEL_REF}.", rich_help_panel=_INPUTS)))
    exact = {1: "The other model", 2: "The two models to merge"}.get(
        method.min_models if method.min_models == method.max_models else 0)
    what = exact or ("Models to merge" if method.base == "none" else "Fine-tuned models to merge")
    sig.append(P("models", P.POSITIONAL_OR_KEYWORD, annotation=List[str], default=typer.Argument(
        ..., metavar="MODEL...", help=what + (": a" if exact == "The other model" else ", each a")
        + " directory, .safetensors file or Hub id.", rich_help_panel=_INPUTS)))
    if method.base == "optional":
        sig.append(P("base", P.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
            None, "--base", metavar="BASE", help="Base model: merge task vectors against it (default: none, the "
            "models themselves).", rich_help_panel=_METHOD)))
    per_model = {f"m_{p.name}": p for p in method.model_params}
    global_ = {f"g_{p.name}": p for p in method.global_params}
    for key, param in [*per_model.items(), *global_.items()]:
        annotation, option = _option(param, key in per_model)
        sig.append(P(key, P.KEYWORD_ONLY, annotation=annotation, default=option))
    sig.append(P("out", P.KEYWORD_ONLY, annotation=Path, default=OUT))
    for key, (annotation, option) in _SHARED.items():
        sig.append(P(key, P.KEYWORD_ONLY, annotation=annotation, default=option))

    def command(**kw):
        recipe_args = dict(
            per_model={p.name: kw[k] for k, p in per_model.items()},
            params={p.name: (kw[k].value if isinstance(kw[k], Enum) else kw[k]) for k, p in global_.items()},
            out_dtype=kw["out_dtype"], allow_nonfinite=kw["allow_nonfinite"],
            tokenizer_source=kw["tokenizer_source"])
        flags = [f for p in per_model.values() for f in (p.cli_flag, _SHORT.get(p.name)) if f]
        _merge_command(method.name, kw.get("base"), kw["models"], kw["out"], recipe_args, kw["shard_size"],
                       kw["max_memory"], kw["threads"], kw["dry_run"], kw["json_out"], kw["force"], kw["quiet"],
                       kw["resume"], flags, kw["part"], kw["ray"])

    command.__signature__ = inspect.Signature(sig)
    command.__name__ = method.name
    doc = f"{method.title}: {method.summary}."
    if method.paper:
        doc += f" Paper: {method.paper}"
    app.command(method.cli_name, help=doc, epilog=f"Example: {method.example}" if method.example else None,
                rich_help_panel="Merge methods", cls=_Command)(command)


def _add_method_commands() -> None:
    from .methods import registry

    for method in registry.all_methods().values():
        _add_method_command(method)


_add_method_commands()


@app.command(cls=_Command, epilog="Example: npmerge run merge.yml -o merged --dry-run")
def run(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="Recipe YAML in mergekit's layout (merge_method, "
                                  "base_model, models or slices, parameters, dtype, out_dtype); models by path or "
                                  "Hub id.", rich_help_panel=_INPUTS),
    out: Path = OUT,
    shard_size: Optional[str] = SHARD, max_memory: Optional[str] = MEM, threads: Optional[int] = THREADS,
    dry_run: bool = DRY, json_out: bool = JSON, force: bool = FORCE, quiet: bool = QUIET, resume: bool = RESUME,
    intermediate_dir: Optional[Path] = typer.Option(
        None, "--intermediate-dir", metavar="DIR", help="Multi-stage recipes: where the named stages are written "
        "(DIR/NAME; default OUT.stages beside OUT).", rich_help_panel=_OUTPUT),
    part: Optional[str] = PART, ray: Optional[str] = RAY,
):
    """Run a merge recipe (YAML), e.g. the npmerge_recipe.yml of an earlier merge; a file of
    several documents (---) runs them as stages, each named stage readable by later ones."""
    from . import stages

    found = []
    _guard(lambda: found.append(stages.read(recipe)), json_out)
    if found[0] is not None and (part is not None or ray is not None):
        _guard(lambda: _refuse(RecipeError("--part and --ray split one merge; a multi-stage recipe is several",
                                           hint="run the stages by hand, each with --part or --ray")), json_out)
    if found[0] is not None:
        _guard(lambda: _run_stages(recipe, found[0], out, intermediate_dir, shard_size, max_memory, threads,
                                   dry_run, json_out, force, quiet, resume), json_out)
        return

    def build():
        from .recipe import Recipe

        return Recipe.from_file(recipe)

    _execute(build, out, shard_size, max_memory, threads, dry_run, json_out, force, quiet, resume, part, ray)


@app.command(cls=_Command, epilog="Example: npmerge assemble merged")
def assemble(
    out: Path = typer.Argument(..., metavar="OUT", help="The output directory the parts were run with (-o).",
                               rich_help_panel=_INPUTS),
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

    _guard(body, json_out)


def _refuse(error: Exception):
    raise error


def _run_stages(source, todo, out, intermediate, shard_size, max_memory, threads, dry_run, json_out, force, quiet,
                resume):
    """Every stage of a multi-stage recipe in order (npmerge/stages.py): a reusable stage
    output is kept, the others merged; the final stage's report and card list the stages."""
    from . import api, render, stages

    paths = stages.outputs(todo, out, intermediate)
    last = stages.final(todo)
    done, planned = [], []
    options = dict(max_memory=max_memory, threads=threads, shard_size=shard_size)
    for stage in todo:
        recipe = stages.recipe(stage, todo, paths, str(source))
        where = paths[stage.number]
        if dry_run and any(paths[s.number] != out and not (paths[s.number] / "npmerge_recipe.yml").is_file()
                           for s in todo if s.name in stage.needs):
            planned.append({"stage": stage.name, "out": str(where), "after": stage.needs})
            if not json_out:
                typer.echo(f"{stage.label} -> {where}: merged after {', '.join(stage.needs)} (planned once they exist)")
            continue
        final = stage is last
        redo = force if final else False
        if not final and where.exists():
            plan = api.plan_merge(recipe, **options)
            try:
                why = stages.reusable(recipe, plan, where)
            finally:
                plan.close()
            if why is None:
                done.append({"stage": stage.name, "method": recipe.method, "out": str(where), "reused": True})
                if not quiet:
                    render.notes([f"{stage.label}: {where} reused (same recipe, inputs unchanged)"])
                continue
            if not quiet:
                render.notes([f"{stage.label}: {where} is out of date ({why}): merged again"])
            redo = True
        if not final and not dry_run:
            where.parent.mkdir(parents=True, exist_ok=True)
        checked = where if final or where.parent.is_dir() else None  # a dry run creates no folder
        plan = api.plan_merge(recipe, **options, out=checked, force=redo, resume=resume and final)
        try:
            if not quiet:
                render.notes(plan.notes)
            if dry_run:
                planned.append({"stage": stage.name, **render.plan_dict(plan, where)})
                if not json_out:
                    typer.echo(f"== {stage.label} -> {where}")
                    render.plan(plan, where)
                continue
            if final:
                plan.stages = done
            started = time.perf_counter()
            with render.progress(plan, disable=quiet or json_out) as advance:
                report = api.execute(plan, where, force=redo, resume=resume and final, progress=advance)
            if not final:
                stages.record(plan, where)
                done.append({"stage": stage.name, "method": recipe.method, "out": str(where), "reused": False})
        finally:
            plan.close()
        if not quiet and not json_out:
            render.notes(report["notes"][len(plan.notes):])
            render.summary(plan, report, where, time.perf_counter() - started)
    if dry_run and json_out:
        typer.echo(json.dumps({"stages": planned}, indent=2))
    elif json_out and not dry_run:
        typer.echo(json.dumps(report, indent=2))


@app.command(cls=_Command, epilog="Example: npmerge info meta-llama/Llama-3.2-1B --tensors | less")
def info(
    path: str = typer.Argument(..., metavar="MODEL", help=f"The model: {MODEL_REF}; or a LoRA adapter directory.",
                               rich_help_panel=_INPUTS),
    json_out: bool = typer.Option(False, "--json", help="Print the facts as JSON on stdout.", rich_help_panel=_DISPLAY),
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor.", rich_help_panel=_DISPLAY),
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

    _guard(body, json_out)


@app.command("inspect", cls=_Command, epilog="Example: npmerge inspect BASE FT1 FT2 --plot fine-tunes.png")
def inspect_command(
    base: str = typer.Argument(..., metavar="BASE", help=f"Base model: {MODEL_REF}.", rich_help_panel=_INPUTS),
    models: List[str] = typer.Argument(..., metavar="MODEL...", help="Fine-tuned models (two or more), each a "
                                       "directory, .safetensors file or Hub id.", rich_help_panel=_INPUTS),
    density: Optional[List[float]] = typer.Option(None, "--density", "-d", metavar="FLOAT", help="Densities at "
                                                  "which to count TIES's sign conflicts (repeatable; default: "
                                                  "0.1, 0.2, ..., 1.0).", rich_help_panel=_METHOD),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE", help="Also draw FILE.png or FILE.svg: cosine "
                                        "similarity by layer and pair, sign conflicts against density (needs "
                                        "npmerge[plot]: matplotlib).", rich_help_panel=_OUTPUT),
    max_memory: Optional[str] = MEM, threads: Optional[int] = THREADS, json_out: bool = JSON, quiet: bool = QUIET,
):
    """How fine-tunes relate, per layer: task-vector norms, pairwise cosine similarity, sign
    conflicts (overall and, per model, against TIES's election at each density), and what a
    merge of them would refuse or note. Streamed in bounded memory."""
    def body():
        from . import render
        from .inspection import DENSITIES, inspect_models

        densities = tuple(sorted(set(density))) if density else DENSITIES
        if any(not 0 < d <= 1 for d in densities):
            raise RecipeError(f"--density must be in (0, 1], got {[d for d in densities if not 0 < d <= 1][0]}")
        if plot is not None:
            render.check_plot_target(plot)
        data = inspect_models(base, list(models), densities=densities, max_memory=max_memory, threads=threads,
                              progress=None if quiet or json_out else render.bar("inspect"))
        if plot is not None:
            render.inspection_plot(data, plot)
        if json_out:
            typer.echo(json.dumps(data, indent=2))
        elif not quiet:
            render.notes(data["notes"])
            render.inspection(data)

    _guard(body, json_out)


@app.command("extract-lora", cls=_Command, epilog="Example: npmerge extract-lora meta-llama/Llama-3.2-1B ./ft "
             "--rank 64 -o ./ft-lora   # then: npmerge task-arithmetic BASE BASE+./ft-lora -o OUT")
def extract_lora(
    base: str = typer.Argument(..., metavar="BASE", help=f"Base model: {MODEL_REF}.", rich_help_panel=_INPUTS),
    ft: str = typer.Argument(..., metavar="FT", help="The fine-tune of BASE: a directory, .safetensors file, Hub id "
                             "or MODEL+ADAPTER.", rich_help_panel=_INPUTS),
    out: Path = typer.Option(..., "-o", "--out", metavar="OUT", help="Output PEFT adapter directory (created "
                             "atomically).", rich_help_panel=_OUTPUT),
    rank: int = typer.Option(128, "--rank", "-r", metavar="INT", help="Largest rank of a module's factors (default: "
                             "128, mergekit's).", show_default=False, rich_help_panel=_METHOD),
    sv_epsilon: float = typer.Option(0.0, "--sv-epsilon", metavar="FLOAT", help="Drop singular values at or below "
                                     "this (default: 0).", show_default=False,
                                     rich_help_panel=_METHOD),
    rank_energy: Optional[float] = typer.Option(None, "--rank-energy", metavar="F", help="Per module, the smallest "
                                                "rank keeping fraction F (0 < F <= 1) of the change's squared "
                                                "Frobenius norm, at most --rank (written as rank_pattern).",
                                                rich_help_panel=_METHOD),
    distribute_scale: bool = typer.Option(True, "--distribute-scale/--no-distribute-scale", help="sqrt(s) on both "
                                          "factors, or s on lora_B (default: --distribute-scale).", show_default=False,
                                          rich_help_panel=_METHOD),
    include: Optional[List[str]] = typer.Option(None, "--include", "-i", metavar="REGEX", help="Only modules whose "
                                                "name matches (re.search; repeatable).", rich_help_panel=_METHOD),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", "-e", metavar="REGEX", help="Leave out modules "
                                                "whose name matches (re.search; repeatable).", rich_help_panel=_METHOD),
    embed_lora: bool = typer.Option(False, "--embed-lora", help="LoRA on the input embedding and the head too "
                                    "(default: saved whole in modules_to_save when changed).", rich_help_panel=_METHOD),
    skip_undecomposable: bool = typer.Option(False, "--skip-undecomposable", help="Leave out changed norms and other "
                                             "tensors no LoRA can hold (default: saved whole).",
                                             rich_help_panel=_METHOD),
    out_dtype: Optional[str] = OUT_DTYPE, max_memory: Optional[str] = MEM, threads: Optional[int] = THREADS,
    dry_run: bool = typer.Option(False, "--dry-run", help="Run every check the extraction makes (inputs, output "
                                 "location, free space, memory per module) and print the plan on stdout; write "
                                 "nothing.", rich_help_panel=_SAFETY),
    force: bool = FORCE,
    json_out: bool = typer.Option(False, "--json", help="Print the report (or the error) as JSON on stdout.",
                                  rich_help_panel=_DISPLAY),
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

    _guard(body, json_out)


@app.command(cls=_Command, epilog="Example: npmerge verify merged --recompute")
def verify(
    out: str = typer.Argument(..., metavar="OUT", help="A merge's output directory, or the Hub id of a merge in the "
                              "local Hugging Face cache.", rich_help_panel=_INPUTS),
    recompute: bool = typer.Option(False, "--recompute", help="Also re-run the output's npmerge_recipe.yml (its "
                                   "inputs checked against the fingerprints the report recorded) into a scratch "
                                   "directory and compare every byte.", rich_help_panel=_METHOD),
    scratch: Optional[Path] = typer.Option(None, "--scratch", metavar="DIR", help="Where --recompute writes its "
                                           "merge, removed afterwards (default: beside OUT; the temp directory "
                                           "for a Hub id).", rich_help_panel=_RESOURCES),
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

    _guard(body, json_out, result_printed=True)


@app.command(cls=_Command, epilog="Example: npmerge warmup --dtype bfloat16 --method ties")
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

    _guard(body, False)


# -- plumbing -------------------------------------------------------------------------
def _merge_command(method, base, models, out, recipe_args, shard_size, max_memory, threads, dry_run,
                   json_out, force, quiet, resume, per_model_flags, part, ray):
    def build():
        from .recipe import Recipe

        for ref in ([base] if base else []) + list(models):
            _refuse_option_value(ref, per_model_flags)
        return Recipe.from_cli(method, base, list(models), **recipe_args)

    _execute(build, out, shard_size, max_memory, threads, dry_run, json_out, force, quiet, resume, part, ray)


def _execute(build_recipe, out, shard_size, max_memory, threads, dry_run, json_out, force, quiet, resume, part=None,
             ray=None):
    def body():
        from . import api, kernels, render
        from .parts import parse_part

        started = time.perf_counter()
        split = parse_part(part) if part is not None else None
        if ray is not None and split is not None:
            raise RecipeError("--ray runs every part itself; give --ray or --part, not both")
        recipe = build_recipe()
        plan = api.plan_merge(recipe, max_memory=max_memory, threads=threads, shard_size=shard_size, out=out,
                              force=force, resume=resume, part=split)
        try:
            if not quiet:
                render.notes(plan.notes)
            if dry_run:
                if json_out:
                    typer.echo(json.dumps(render.plan_dict(plan, out), indent=2))
                else:
                    render.plan(plan, out)
                return
            if ray is not None:
                report = _on_ray(plan, out, ray, threads, force, max_memory, quiet or json_out)
            else:
                with render.progress(plan, disable=quiet or json_out) as advance:
                    report = api.execute(plan, out, force=force, resume=resume, progress=advance, part=split)
        finally:
            plan.close()
        if split is not None:
            render.part_done(report, out, json_out, quiet)
            return
        elapsed = time.perf_counter() - started
        if not quiet:
            render.notes(report["notes"][len(plan.notes):])  # found while merging
            render.notes([n for n in [kernels.cache_note()] if n])  # not in the report: not part of the output
        if json_out:
            typer.echo(json.dumps(report, indent=2))
        elif not quiet:
            render.summary(plan, report, out, elapsed)

    _guard(body, json_out)


def _on_ray(plan, out, address, threads, force, max_memory, quiet) -> dict:
    """The merge as parts on Ray (this command with --part I/N in each task), then assembled here."""
    from . import parts, ray_parts, render

    if plan.one_file:
        raise RecipeError("--ray splits a model directory by shards; a one-file output is one shard",
                          hint="give -o a directory")
    total = sum(s.size for s in plan.layout.shards)
    advance = render.bar("ray")(total) if not quiet else None
    ray_parts.run_parts(ray_parts.strip_ray(_ARGV, address), None, threads or 1, len(plan.layout.shards),
                        None if address == "local" else address,
                        progress=(lambda nbytes: advance(nbytes, "part")) if advance else None)
    return parts.assemble(out, force=force, max_memory=max_memory, threads=threads)


_ARGV: list[str] = []  # the command line main() parses, for hints that quote it
_FLAG_WORDS = {"true", "false", "yes", "no", "on", "off"}


def _refuse_option_value(ref: str, per_model_flags: list[str]) -> None:
    """A model argument that does not exist and reads as a number or a yes/no word was meant
    for an option (`--density 0.5 0.3`, `--dry-run true`): say so, instead of "model path
    '0.3' does not exist"."""
    if os.path.lexists(os.path.expanduser(ref)) or not (_is_number(ref) or ref.lower() in _FLAG_WORDS):
        return
    def is_option(word: str) -> bool:
        return word.startswith("-") and not _is_number(word)

    # where it stands: not right after an option that takes a value (that value is the option's)
    at = next((i for i, word in enumerate(_ARGV) if word == ref and (ref.lower() in _FLAG_WORDS or i == 0
                                                                     or not is_option(_ARGV[i - 1]))), -1)
    values, k, j = [ref], at - 1, at + 1
    while k >= 0 and _is_number(_ARGV[k]):
        values.insert(0, _ARGV[k])
        k -= 1
    while 0 < j < len(_ARGV) and _is_number(_ARGV[j]) and not os.path.lexists(_ARGV[j]):
        values.append(_ARGV[j])
        j += 1
    flag = _ARGV[k] if at >= 0 and k >= 0 and is_option(_ARGV[k]) else None
    if flag in per_model_flags and _is_number(ref):
        hint = f"{flag} takes one value: repeat it, once per model in order: " + " ".join(f"{flag} {v}" for v in values)
    elif flag is not None and ref.lower() in _FLAG_WORDS and len(values) == 1:
        hint = f"{flag} is a flag and takes no value: write just {flag}"
    elif flag is not None and _is_number(ref):
        hint = f"{flag} takes one value; '{ref}' was read as a model"
    else:
        example = f", e.g. {per_model_flags[0]} 0.5 {per_model_flags[0]} 0.3" if per_model_flags else ""
        hint = f"an option takes one value: repeat the option for each value{example}"
    raise RecipeError(f"model path '{ref}' does not exist; it looks like a value meant for an option", hint=hint)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_SIGNALS = {signal.SIGTERM: (143, "terminated"), signal.SIGHUP: (129, "hung up")}


def _on_signal(signum, frame):
    """SIGTERM/SIGHUP end Python without running `finally` blocks; raising runs the cleanup."""
    raise SystemExit(_SIGNALS[signum][0])


def _guard(body, json_out: bool, result_printed: bool = False) -> None:
    """Run a command body; turn npmerge errors and interrupts into messages and exit codes.
    `result_printed`: a failure the body reported as its JSON result (verify) is not printed
    as a second JSON document."""
    previous = {sig: signal.signal(sig, _on_signal) for sig in _SIGNALS}
    try:
        body()
    except NpmergeError as exc:
        if os.environ.get("NPMERGE_DEBUG"):
            raise
        printed = result_printed and isinstance(exc, VerifyFailed)
        _fail(exc.exit_code, exc.code, exc.message, [exc.hint, getattr(exc, "resume_hint", None)],
              json_out and not printed)
    except KeyboardInterrupt as exc:
        _fail(130, "interrupted", "interrupted; no output was written", [getattr(exc, "resume_hint", None)], json_out)
    except SystemExit as exc:
        for code, what in _SIGNALS.values():
            if exc.code == code:
                _fail(code, what.replace(" ", "_"), f"{what}; no output was written",
                      [getattr(exc, "resume_hint", None)], json_out)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


MESSAGE_LINE = 1000  # characters of an error or hint line shown (a value quoted in it may be huge)


def _cut(line: str) -> str:
    return line if len(line) <= MESSAGE_LINE else f"{line[:MESSAGE_LINE]}... ({len(line) - MESSAGE_LINE:,} more characters)"


def _fail(code: int, kind: str, message: str, hints: list, json_out: bool):
    hints = [_cut(str(h)) for h in hints if h]
    message = "\n".join(_cut(line) for line in str(message).split("\n"))
    if json_out:
        typer.echo(json.dumps({"error": {"code": kind, "exit_code": code, "message": message,
                                         "hint": "; ".join(hints) or None}}))
    first, *rest = message.split("\n")
    sys.stderr.write(f"Error: {first}\n" + "".join(f"{line}\n" for line in rest))
    sys.stderr.write("".join(f"Hint: {h}\n" for h in hints))
    raise typer.Exit(code)


def _usage_error_class() -> type:
    """Typer >= 0.2x vendors click (its errors derive from TyperException); older Typer uses click's."""
    base = getattr(typer, "TyperException", None)
    if base is None:
        import click

        base = click.ClickException
    return base


def main(argv: list[str] | None = None) -> None:
    """The console entry point; usage errors get the same `Error:`/`Hint:` lines as the rest."""
    _ARGV[:] = list(argv) if argv is not None else sys.argv[1:]
    try:
        code = app(args=argv, prog_name="npmerge", standalone_mode=False)
    except _usage_error_class() as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `npmerge`: the help, as a usage error
            sys.stderr.write(exc.format_message() + "\n")
            code = exc.exit_code
        else:
            ctx = getattr(exc, "ctx", None)
            hints = [f"see '{ctx.command_path} --help'"] if ctx is not None else []
            if _is_number(getattr(exc, "option_name", None) or "x"):  # `-w -0.5 -0.3`: "-0.3" read as an option
                hints.insert(0, "an option takes one value: repeat the option for each value, e.g. -w -0.5 -w -0.3")
            try:
                _fail(exc.exit_code, "usage", exc.format_message(), hints, "--json" in (argv or sys.argv[1:]))
            except typer.Exit as done:
                code = done.exit_code
    except typer.Abort:
        sys.stderr.write("Error: interrupted\n")
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


def entry() -> None:
    """The `npmerge` script and `python -m npmerge`: main(), then exit without tearing the
    interpreter down: with numba loaded that takes ~0.4 s, a third of a cached run, and
    there is nothing left to do (every file is written and closed, every thread joined)."""
    try:
        main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    else:
        code = 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
