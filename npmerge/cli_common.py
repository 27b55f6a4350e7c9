"""What every npmerge command shares: its help-page conventions (panels, the shared options,
flags without types, arguments by name), exit codes, and how a command body's errors and
signals become `Error:`/`Hint:` lines and exit codes (docs/format-and-safety.md §4)."""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
from typing import Optional

import typer
from typer.core import TyperCommand, TyperGroup

from .errors import NpmergeError, VerifyFailed

EXIT_CODES = ((0, "done"), (2, "usage or recipe error"), (3, "invalid input file"), (4, "incompatible models"),
              (5, "output not writable, disk full or locked"),
              (6, "verify: the output differs from its report or recipe"), (130, "interrupted (Ctrl-C)"),
              (143, "terminated (SIGTERM)"), (129, "hung up (SIGHUP)"),
              (1, "a bug in npmerge (NPMERGE_DEBUG=1 shows the traceback)"))
MODEL_REF = ("a model directory, a .safetensors file, or a Hub id (org/name or org/name@revision) from the Hugging "
             "Face cache")


class FlagsAsFlags:
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
                param.rich_help_panel = DISPLAY
        return params


class Command(FlagsAsFlags, TyperCommand):
    """A command whose docstring reads as paragraphs, not as its source's line breaks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.help:
            self.help = "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(self.help).split("\n\n"))


class Group(FlagsAsFlags, TyperGroup):
    pass


# -- shared options -------------------------------------------------------------------
# One panel per purpose; defaults written one way: "(default: X)".
METHOD, INPUTS, OUTPUT, RESOURCES, SAFETY, DISPLAY = ("Method", "Inputs", "Output", "Resources", "Safety",
                                                            "Display")
OUT = typer.Option(..., "-o", "--out", metavar="OUT", help="Output model directory, or one file when OUT ends in "
                   ".safetensors (diffusion tools); created atomically.", rich_help_panel=OUTPUT)
OUT_DTYPE = typer.Option(None, "--out-dtype", metavar="DTYPE",
                         help="Output dtype: bfloat16, float16, float32 (default: the base's).", rich_help_panel=OUTPUT)
SHARD = typer.Option(None, "--shard-size", metavar="SIZE", help="Max tensor bytes per output shard, e.g. 5GB "
                     "(default: 5GB; for one .safetensors file its limit, default: 50GB).", rich_help_panel=OUTPUT)
MEM = typer.Option(None, "--max-memory", metavar="SIZE", help="Working-memory budget, e.g. 512MiB, 4GiB (default: 1/4 "
                   "of available RAM, at most 4GiB).", rich_help_panel=RESOURCES)
THREADS = typer.Option(None, "--threads", metavar="N", help="Compute threads (default: all cores).",
                       rich_help_panel=RESOURCES)
DRY = typer.Option(False, "--dry-run", help="Run every check the merge makes (inputs, output location, free space, "
                   "lock) and print the plan on stdout; write nothing.", rich_help_panel=SAFETY)
JSON = typer.Option(False, "--json", help="Print the merge report (or the plan, or the error) as JSON on stdout.",
                    rich_help_panel=DISPLAY)
FORCE = typer.Option(False, "--force", help="Replace an existing output directory.", rich_help_panel=SAFETY)
NONFINITE = typer.Option(False, "--allow-nonfinite", help="Merge even if a weight is NaN or Inf.",
                         rich_help_panel=SAFETY)
QUIET = typer.Option(False, "-q", "--quiet", help="No progress bar, notes or summary.", rich_help_panel=DISPLAY)
RESUME = typer.Option(False, "--resume", help="Continue an interrupted merge into the same -o: its finished shards "
                      "are verified (sha256) and kept. Refused if the recipe or inputs changed.", rich_help_panel=SAFETY)
TOKENIZER = typer.Option(None, "--tokenizer-source", metavar="SOURCE", help="Map embedding and head rows by token "
                         "to an output vocabulary: base (the base's), union (every model's tokens) or one of the "
                         "models; its tokenizer files are written (default: none, rows merged by position, the base's "
                         "tokenizer copied).", rich_help_panel=OUTPUT)
PART = typer.Option(None, "--part", metavar="I/N", help="Merge only part I of N (whole output shards, balanced by "
                   "bytes) into a staging directory beside -o, on a filesystem every node sees; then `npmerge "
                   "assemble OUT` (see README 'Beyond one machine').", rich_help_panel=RESOURCES)
RAY = typer.Option(None, "--ray", metavar="ADDRESS", help="Run the merge as parts on Ray and assemble it: 'local' "
                  "(a Ray started here), 'auto' (the cluster `ray start` made) or a cluster address; --threads CPUs "
                  "per part (default: 1), one part per share of the cluster's CPUs, at most one per shard; needs "
                  "npmerge[ray].", rich_help_panel=RESOURCES)
SHARED = dict(tokenizer_source=(Optional[str], TOKENIZER),
               out_dtype=(Optional[str], OUT_DTYPE), shard_size=(Optional[str], SHARD), max_memory=(Optional[str], MEM),
               threads=(Optional[int], THREADS), dry_run=(bool, DRY), json_out=(bool, JSON), force=(bool, FORCE),
               allow_nonfinite=(bool, NONFINITE), quiet=(bool, QUIET), resume=(bool, RESUME), part=(Optional[str], PART),
               ray=(Optional[str], RAY))


SIGNALS = {signal.SIGTERM: (143, "terminated"), signal.SIGHUP: (129, "hung up")}


def on_signal(signum, frame):
    """SIGTERM/SIGHUP end Python without running `finally` blocks; raising runs the cleanup."""
    raise SystemExit(SIGNALS[signum][0])


def guard(body, json_out: bool, result_printed: bool = False) -> None:
    """Run a command body; turn npmerge errors and interrupts into messages and exit codes.
    `result_printed`: a failure the body reported as its JSON result (verify) is not printed
    as a second JSON document."""
    previous = {sig: signal.signal(sig, on_signal) for sig in SIGNALS}
    try:
        body()
    except NpmergeError as exc:
        if os.environ.get("NPMERGE_DEBUG"):
            raise
        printed = result_printed and isinstance(exc, VerifyFailed)
        fail(exc.exit_code, exc.code, exc.message, [exc.hint, getattr(exc, "resume_hint", None)],
              json_out and not printed)
    except KeyboardInterrupt as exc:
        fail(130, "interrupted", "interrupted; no output was written", [getattr(exc, "resume_hint", None)], json_out)
    except SystemExit as exc:
        for code, what in SIGNALS.values():
            if exc.code == code:
                fail(code, what.replace(" ", "_"), f"{what}; no output was written",
                      [getattr(exc, "resume_hint", None)], json_out)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


MESSAGE_LINE = 1000  # characters of an error or hint line shown (a value quoted in it may be huge)


def cut(line: str) -> str:
    return line if len(line) <= MESSAGE_LINE else f"{line[:MESSAGE_LINE]}... ({len(line) - MESSAGE_LINE:,} more characters)"


def fail(code: int, kind: str, message: str, hints: list, json_out: bool):
    hints = [cut(str(h)) for h in hints if h]
    message = "\n".join(cut(line) for line in str(message).split("\n"))
    if json_out:
        typer.echo(json.dumps({"error": {"code": kind, "exit_code": code, "message": message,
                                         "hint": "; ".join(hints) or None}}))
    first, *rest = message.split("\n")
    sys.stderr.write(f"Error: {first}\n" + "".join(f"{line}\n" for line in rest))
    sys.stderr.write("".join(f"Hint: {h}\n" for h in hints))
    raise typer.Exit(code)
