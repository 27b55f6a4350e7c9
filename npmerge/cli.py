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
import sys  # noqa: E402
import time  # noqa: E402
from enum import Enum  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import List, Optional  # noqa: E402

import typer  # noqa: E402

from . import cli_tools  # noqa: E402
from .cli_common import (DRY, EXIT_CODES, FORCE, INPUTS, JSON, MEM, METHOD, MODEL_REF, OUT, OUTPUT, PART, QUIET, RAY,  # noqa: E402
                         RESUME, SHARD, SHARED, THREADS, Command, Group, fail, guard)
from .errors import RecipeError  # noqa: E402

app = typer.Typer(
    name="npmerge",
    cls=Group,
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


_SHORT = {"weight": "-w", "density": "-d", "t": "-t"}


# -- one subcommand per registered method ----------------------------------------------
def _option(param, per_model: bool):
    """The typer annotation and Option of one method parameter."""
    default = ("not given" if param.optional else "required") if param.default is None else (
        f"default: {param.cli_flag if param.default else '--no-' + param.cli_flag[2:]}" if param.kind == "bool"
        else f"default: {param.default}")
    flags = [param.cli_flag] + ([_SHORT[param.name]] if param.name in _SHORT else [])
    panel = METHOD
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
            ..., metavar="BASE", help=f"Base model: {MODEL_REF}.", rich_help_panel=INPUTS)))
    exact = {1: "The other model", 2: "The two models to merge"}.get(
        method.min_models if method.min_models == method.max_models else 0)
    what = exact or ("Models to merge" if method.base == "none" else "Fine-tuned models to merge")
    sig.append(P("models", P.POSITIONAL_OR_KEYWORD, annotation=List[str], default=typer.Argument(
        ..., metavar="MODEL...", help=what + (": a" if exact == "The other model" else ", each a")
        + " directory, .safetensors file or Hub id.", rich_help_panel=INPUTS)))
    if method.base == "optional":
        sig.append(P("base", P.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
            None, "--base", metavar="BASE", help="Base model: merge task vectors against it (default: none, the "
            "models themselves).", rich_help_panel=METHOD)))
    per_model = {f"m_{p.name}": p for p in method.model_params}
    global_ = {f"g_{p.name}": p for p in method.global_params}
    for key, param in [*per_model.items(), *global_.items()]:
        annotation, option = _option(param, key in per_model)
        sig.append(P(key, P.KEYWORD_ONLY, annotation=annotation, default=option))
    sig.append(P("out", P.KEYWORD_ONLY, annotation=Path, default=OUT))
    for key, (annotation, option) in SHARED.items():
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
                rich_help_panel="Merge methods", cls=Command)(command)


def _add_method_commands() -> None:
    from .methods import registry

    for method in registry.all_methods().values():
        _add_method_command(method)


_add_method_commands()


@app.command(cls=Command, epilog="Example: npmerge run merge.yml -o merged --dry-run")
def run(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="Recipe YAML in mergekit's layout (merge_method, "
                                  "base_model, models or slices, parameters, dtype, out_dtype); models by path or "
                                  "Hub id.", rich_help_panel=INPUTS),
    out: Path = OUT,
    shard_size: Optional[str] = SHARD, max_memory: Optional[str] = MEM, threads: Optional[int] = THREADS,
    dry_run: bool = DRY, json_out: bool = JSON, force: bool = FORCE, quiet: bool = QUIET, resume: bool = RESUME,
    intermediate_dir: Optional[Path] = typer.Option(
        None, "--intermediate-dir", metavar="DIR", help="Multi-stage recipes: where the named stages are written "
        "(DIR/NAME; default OUT.stages beside OUT).", rich_help_panel=OUTPUT),
    part: Optional[str] = PART, ray: Optional[str] = RAY,
):
    """Run a merge recipe (YAML), e.g. the npmerge_recipe.yml of an earlier merge; a file of
    several documents (---) runs them as stages, each named stage readable by later ones."""
    from . import stages

    found = []
    guard(lambda: found.append(stages.read(recipe)), json_out)
    if found[0] is not None and (part is not None or ray is not None):
        guard(lambda: _refuse(RecipeError("--part and --ray split one merge; a multi-stage recipe is several",
                                           hint="run the stages by hand, each with --part or --ray")), json_out)
    if found[0] is not None:
        guard(lambda: _run_stages(recipe, found[0], out, intermediate_dir, shard_size, max_memory, threads,
                                   dry_run, json_out, force, quiet, resume), json_out)
        return

    def build():
        from .recipe import Recipe

        return Recipe.from_file(recipe)

    _execute(build, out, shard_size, max_memory, threads, dry_run, json_out, force, quiet, resume, part, ray)


cli_tools.register(app)  # after run: the Commands panel lists them in this order


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
            from .parts import finished_parts

            n = split[1]
            render.part_done(report, sorted(i for i, m in finished_parts(out) if m == n), out, json_out, quiet)
            return
        elapsed = time.perf_counter() - started
        if not quiet:
            render.notes(report["notes"][len(plan.notes):])  # found while merging
            render.notes([n for n in [kernels.cache_note()] if n])  # not in the report: not part of the output
        if json_out:
            typer.echo(json.dumps(report, indent=2))
        elif not quiet:
            render.summary(plan, report, out, elapsed)

    guard(body, json_out)


def _on_ray(plan, out, address, threads, force, max_memory, quiet) -> dict:
    """The merge as parts on Ray (this command with --part I/N in each task), then assembled here."""
    from . import parts, ray_parts, render

    if plan.one_file:
        raise RecipeError("--ray splits a model directory by shards; a one-file output is one shard",
                          hint="give -o a directory")
    with render.progress_bar("ray", sum(s.size for s in plan.layout.shards), disable=quiet) as advance:
        ray_parts.run_parts(ray_parts.strip_ray(_ARGV, address), None, threads or 1, len(plan.layout.shards),
                            None if address == "local" else address, progress=lambda nbytes: advance(nbytes, "part"))
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
                fail(exc.exit_code, "usage", exc.format_message(), hints, "--json" in (argv or sys.argv[1:]))
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
