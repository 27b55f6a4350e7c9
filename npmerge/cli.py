"""The `npmerge` command line: parse flags into a Recipe, call the API, render.

Thin on purpose: no business logic here. Progress and tables go to stderr (rich),
`--json` output to stdout. Errors, usage errors included, print `Error:` and `Hint:`
lines and exit with the error's code (FORMAT-AND-SAFETY.md §5); Ctrl-C exits 130,
SIGTERM 143 and SIGHUP 129, never leaving an output directory (finished shards stay in
staging for --resume). NPMERGE_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import time
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .errors import NpmergeError

app = typer.Typer(
    name="npmerge",
    help="Merge fine-tuned safetensors checkpoints (TIES and its family) exactly, "
         "in bounded memory, on CPU. No PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        typer.echo(f"npmerge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version and exit.")):
    """Merge fine-tuned safetensors checkpoints exactly, in bounded memory, without PyTorch."""


# -- shared options -------------------------------------------------------------------
_OUTPUT, _RESOURCES, _SAFETY = "Output", "Resources", "Safety"
OUT = typer.Option(..., "-o", "--out", help="Output model directory (created atomically).", rich_help_panel=_OUTPUT)
OUT_DTYPE = typer.Option(None, "--out-dtype", help="Output dtype: bfloat16, float16, float32 (default: the base's).",
                         rich_help_panel=_OUTPUT)
SHARD = typer.Option(None, "--shard-size", help="Max tensor bytes per output shard, e.g. 5GB (default 5GB).",
                     rich_help_panel=_OUTPUT)
MEM = typer.Option(None, "--max-memory", help="Working-memory budget, e.g. 512MiB, 4GiB (default: 1/4 of free RAM, "
                   "max 4GiB).", rich_help_panel=_RESOURCES)
THREADS = typer.Option(None, "--threads", help="Compute threads (default: all cores).", rich_help_panel=_RESOURCES)
DRY = typer.Option(False, "--dry-run", help="Check inputs and print the plan; write nothing.", rich_help_panel=_OUTPUT)
JSON = typer.Option(False, "--json", help="Print the merge report (or error) as JSON on stdout.",
                    rich_help_panel=_OUTPUT)
FORCE = typer.Option(False, "--force", help="Replace an existing output directory.", rich_help_panel=_SAFETY)
NONFINITE = typer.Option(False, "--allow-nonfinite", help="Merge even if a weight is NaN or Inf.",
                         rich_help_panel=_SAFETY)
QUIET = typer.Option(False, "-q", "--quiet", help="No progress bar or summary.", rich_help_panel=_OUTPUT)
RESUME = typer.Option(False, "--resume", help="Continue an interrupted merge into the same -o: its finished shards "
                      "are verified (sha256) and kept. Refused if the recipe or inputs changed.", rich_help_panel=_SAFETY)
_SHARED = dict(out_dtype=(Optional[str], OUT_DTYPE), shard_size=(Optional[str], SHARD), max_memory=(Optional[str], MEM),
               threads=(Optional[int], THREADS), dry_run=(bool, DRY), json_out=(bool, JSON), force=(bool, FORCE),
               allow_nonfinite=(bool, NONFINITE), quiet=(bool, QUIET), resume=(bool, RESUME))
_SHORT = {"weight": "-w", "density": "-d"}


# -- one subcommand per registered method ----------------------------------------------
def _option(param, per_model: bool):
    """The typer annotation and Option of one method parameter."""
    default = "required" if param.default is None else f"default {param.default}"
    flags = [param.cli_flag] + ([_SHORT[param.name]] if param.name in _SHORT else [])
    panel = "Method"
    if per_model:
        return (Optional[List[float]], typer.Option(
            None, *flags, help=f"{param.help[0].upper()}{param.help[1:]}; repeat once per model, in order, or give "
                               f"once for all ({default}).", rich_help_panel=panel))
    if param.kind == "bool":
        name = param.cli_flag[2:]
        return Optional[bool], typer.Option(None, f"--{name}/--no-{name}", help=f"{param.help[0].upper()}"
                                            f"{param.help[1:]} ({default}).", rich_help_panel=panel)
    if param.kind == "choice":
        choices = Enum(param.name.title(), {str(o): str(o) for o in param.check.options}, type=str)
        return Optional[choices], typer.Option(None, *flags, help=f"{param.help[0].upper()}{param.help[1:]} "
                                               f"({default}).", rich_help_panel=panel)
    typ = Optional[int] if param.kind == "int" else Optional[float]
    return typ, typer.Option(None, *flags, help=f"{param.help[0].upper()}{param.help[1:]} ({default}).",
                             rich_help_panel=panel)


def _add_method_command(method) -> None:
    """`npmerge <method> [BASE] MODELS... -o OUT [options]`, generated from the registry entry."""
    P = inspect.Parameter
    sig: list = []
    if method.base == "required":
        sig.append(P("base", P.POSITIONAL_OR_KEYWORD, annotation=str,
                     default=typer.Argument(..., help="Base model (directory or .safetensors file).")))
    sig.append(P("models", P.POSITIONAL_OR_KEYWORD, annotation=List[str],
                 default=typer.Argument(..., help="Models to merge." if method.base == "none"
                                        else "Fine-tuned models to merge.")))
    if method.base == "optional":
        sig.append(P("base", P.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
            None, "--base", help="Base model: merge task vectors against it (optional).", rich_help_panel="Inputs")))
    sig.append(P("out", P.KEYWORD_ONLY, annotation=Path, default=OUT))
    per_model = {f"m_{p.name}": p for p in method.model_params}
    global_ = {f"g_{p.name}": p for p in method.global_params}
    for key, param in [*per_model.items(), *global_.items()]:
        annotation, option = _option(param, key in per_model)
        sig.append(P(key, P.KEYWORD_ONLY, annotation=annotation, default=option))
    for key, (annotation, option) in _SHARED.items():
        sig.append(P(key, P.KEYWORD_ONLY, annotation=annotation, default=option))

    def command(**kw):
        recipe_args = dict(
            per_model={p.name: kw[k] for k, p in per_model.items()},
            params={p.name: (kw[k].value if isinstance(kw[k], Enum) else kw[k]) for k, p in global_.items()},
            out_dtype=kw["out_dtype"], allow_nonfinite=kw["allow_nonfinite"])
        _merge_command(method.name, kw.get("base"), kw["models"], kw["out"], recipe_args, kw["shard_size"],
                       kw["max_memory"], kw["threads"], kw["dry_run"], kw["json_out"], kw["force"], kw["quiet"],
                       kw["resume"])

    command.__signature__ = inspect.Signature(sig)
    command.__name__ = method.name
    doc = f"{method.title}: {method.summary}."
    if method.paper:
        doc += f" Paper: {method.paper}"
    app.command(method.cli_name, help=doc, epilog=f"Example: {method.example}" if method.example else None,
                rich_help_panel="Merge methods")(command)


def _add_method_commands() -> None:
    from .methods import registry

    for method in registry.all_methods().values():
        _add_method_command(method)


_add_method_commands()


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML in mergekit's layout (merge_method, base_model, models, parameters)."),
    out: Path = OUT,
    shard_size: Optional[str] = SHARD, max_memory: Optional[str] = MEM, threads: Optional[int] = THREADS,
    dry_run: bool = DRY, json_out: bool = JSON, force: bool = FORCE, quiet: bool = QUIET, resume: bool = RESUME,
):
    """Run a merge recipe (YAML), e.g. the npmerge_recipe.yml of an earlier merge."""
    def build():
        from .recipe import Recipe

        try:
            text = recipe.read_text(encoding="utf-8")
        except OSError as exc:
            from .errors import RecipeError

            raise RecipeError(f"cannot read recipe '{recipe}': {exc.strerror}") from None
        return Recipe.from_yaml(text, str(recipe))

    _execute(build, out, shard_size, max_memory, threads, dry_run, json_out, force, quiet, resume)


@app.command()
def info(
    path: str = typer.Argument(..., help="A model directory, .safetensors file or LoRA adapter directory."),
    json_out: bool = JSON,
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor."),
):
    """Show a checkpoint's tensors, dtypes, parameter count and shards (validates every header);
    for a LoRA adapter directory, the adapter: rank, alpha, scale, target modules, base."""
    def body():
        from .io.checkpoint import Checkpoint
        from .io.lora import LoraAdapter, is_lora_adapter

        if is_lora_adapter(path):
            adapter = LoraAdapter(path)
            data = {"path": str(path), "adapter": adapter.summary()}
            adapter.close()
            if json_out:
                typer.echo(json.dumps(data, indent=2))
                return
            from . import render

            render.adapter_info(data)
            return
        ckpt = Checkpoint(path)
        dtypes: dict[str, int] = {}
        for ref in ckpt.tensors.values():
            dtypes[ref.info.dtype.name] = dtypes.get(ref.info.dtype.name, 0) + ref.info.numel
        data = {"path": str(path), "tensors": len(ckpt.tensors), "parameters": ckpt.total_params,
                "bytes": ckpt.total_bytes, "dtypes": dtypes,
                "shards": [Path(p).name for p in ckpt.files],
                "architecture": (ckpt.config or {}).get("architectures", [None])[0] if ckpt.config else None}
        if tensors or json_out:
            data["tensor_list"] = [{"name": n, "dtype": r.info.dtype.name, "shape": list(r.info.shape),
                                    "file": Path(r.file.path).name} for n, r in ckpt.tensors.items()]
        ckpt.close()
        if json_out:
            typer.echo(json.dumps(data, indent=2))
            return
        from . import render

        render.info(data, tensors)

    _guard(body, json_out)


@app.command()
def warmup():
    """Compile and cache every kernel now (e.g. while building a container image)."""
    def body():
        from . import render
        from .warmup import compile_all

        seconds = compile_all()
        render.stderr().print(f"kernels compiled and cached in {seconds:.1f} s")

    _guard(body, False)


# -- plumbing -------------------------------------------------------------------------
def _merge_command(method, base, models, out, recipe_args, shard_size, max_memory, threads, dry_run,
                   json_out, force, quiet, resume):
    def build():
        from .recipe import Recipe

        return Recipe.from_cli(method, base, list(models), **recipe_args)

    _execute(build, out, shard_size, max_memory, threads, dry_run, json_out, force, quiet, resume)


def _execute(build_recipe, out, shard_size, max_memory, threads, dry_run, json_out, force, quiet, resume):
    def body():
        from . import api, render

        started = time.perf_counter()
        recipe = build_recipe()
        plan = api.plan_merge(recipe, max_memory=max_memory, threads=threads, shard_size=shard_size)
        try:
            if dry_run:
                if json_out:
                    typer.echo(json.dumps(render.plan_dict(plan, out), indent=2))
                else:
                    render.plan(plan, out)
                return
            with render.progress(plan, disable=quiet or json_out) as advance:
                report = api.execute(plan, out, force=force, resume=resume, progress=advance)
        finally:
            plan.close()
        elapsed = time.perf_counter() - started
        if json_out:
            typer.echo(json.dumps(report, indent=2))
        elif not quiet:
            render.summary(plan, report, out, elapsed)

    _guard(body, json_out)


_SIGNALS = {signal.SIGTERM: (143, "terminated"), signal.SIGHUP: (129, "hung up")}


def _on_signal(signum, frame):
    """SIGTERM/SIGHUP end Python without running `finally` blocks; raising runs the cleanup."""
    raise SystemExit(_SIGNALS[signum][0])


def _guard(body, json_out: bool) -> None:
    """Run a command body; turn npmerge errors and interrupts into messages and exit codes."""
    previous = {sig: signal.signal(sig, _on_signal) for sig in _SIGNALS}
    try:
        body()
    except NpmergeError as exc:
        if os.environ.get("NPMERGE_DEBUG"):
            raise
        _fail(exc.exit_code, exc.code, exc.message, [exc.hint, getattr(exc, "resume_hint", None)], json_out)
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


def _fail(code: int, kind: str, message: str, hints: list, json_out: bool):
    hints = [h for h in hints if h]
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
    try:
        code = app(args=argv, prog_name="npmerge", standalone_mode=False)
    except _usage_error_class() as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `npmerge`: the help, as a usage error
            sys.stderr.write(exc.format_message() + "\n")
            code = exc.exit_code
        else:
            ctx = getattr(exc, "ctx", None)
            hints = [f"see '{ctx.command_path} --help'"] if ctx is not None else []
            try:
                _fail(exc.exit_code, "usage", exc.format_message(), hints, "--json" in (argv or sys.argv[1:]))
            except typer.Exit as done:
                code = done.exit_code
    except typer.Abort:
        sys.stderr.write("Error: interrupted\n")
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
