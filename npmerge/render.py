"""Human output of the CLI (rich, on stderr): plans, progress, summaries, info."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.table import Table

from .units import human_bytes

_console: Console | None = None


def stderr() -> Console:
    global _console
    if _console is None:
        _console = Console(stderr=True)
    return _console


def info(data: dict, tensors: bool) -> None:
    c = stderr()
    table = Table(title=str(data["path"]), show_header=False)
    table.add_row("architecture", str(data.get("architecture") or "-"))
    table.add_row("tensors", f"{data['tensors']:,}")
    table.add_row("parameters", f"{data['parameters']:,}")
    table.add_row("size", human_bytes(data["bytes"]))
    table.add_row("dtypes", ", ".join(f"{k} ({v:,} params)" for k, v in data["dtypes"].items()))
    table.add_row("files", "\n".join(data["shards"]))
    c.print(table)
    if tensors:
        t = Table("name", "dtype", "shape", "file")
        for row in data["tensor_list"]:
            t.add_row(row["name"], row["dtype"], str(row["shape"]), row["file"])
        c.print(t)


def plan_dict(plan, out) -> dict:
    return {
        "method": plan.method.name,
        "base": plan.recipe.base,
        "models": [{"path": e.path, "parameters": p} for e, p in zip(plan.recipe.models, plan.model_params)],
        "parameters": plan.global_params,
        "out": str(out),
        "tensors_merged": sum(1 for j in plan.jobs if not j.copy),
        "tensors_copied": sum(1 for j in plan.jobs if j.copy),
        "shards": [s.filename for s in plan.layout.shards],
        "read_bytes": plan.read_bytes,
        "streamed_bytes": plan.total_work,
        "write_bytes": sum(s.size for s in plan.layout.shards),
        "memory_budget": plan.budget,
        "working_memory": plan.work_bytes,
        "span_elements": plan.span,
        "threads": plan.threads,
        "notes": plan.notes,
    }


def plan(plan, out) -> None:
    d = plan_dict(plan, out)
    t = Table(title=f"npmerge plan: {d['method']} -> {out}", show_header=False)
    if d["base"]:
        t.add_row("base", d["base"])
    for i, m in enumerate(d["models"]):
        t.add_row(f"model {i + 1}", f"{m['path']}  " + ", ".join(f"{k}={v}" for k, v in m["parameters"].items()))
    t.add_row("parameters", ", ".join(f"{k}={v}" for k, v in d["parameters"].items()) or "-")
    t.add_row("tensors", f"{d['tensors_merged']} merged, {d['tensors_copied']} copied")
    t.add_row("output", f"{len(d['shards'])} shard(s), {human_bytes(d['write_bytes'])}")
    t.add_row("reads", f"{human_bytes(d['read_bytes'])} of input, at most {human_bytes(d['streamed_bytes'])} streamed over all passes")
    t.add_row("memory", f"{human_bytes(d['working_memory'], True)} working buffers (budget "
                        f"{human_bytes(d['memory_budget'], True)}), "
                        f"spans of up to {d['span_elements']:,} elements")
    t.add_row("threads", str(d["threads"]))
    for note in d["notes"]:
        t.add_row("note", note)
    stderr().print(t)


@contextlib.contextmanager
def progress(plan, disable: bool):
    # Only on a terminal: in a log or pipe a bar is noise, and `Error:` must stay the first line.
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=stderr(),
                   disable=disable or not stderr().is_terminal, transient=False)
    with bar:
        task = bar.add_task(plan.method.name, total=plan.total_work)

        def advance(nbytes: int, name: str) -> None:
            bar.update(task, advance=nbytes)

        try:
            yield advance
        except BaseException:
            bar.live.transient = True  # failed or interrupted: the bar goes, `Error:` is the first line
            raise


def _fmt(spec, value: float) -> str:
    if spec.fmt == "percent":
        return f"{value:.1%}"
    if spec.fmt == "degrees":
        return f"{value:.2f}°"
    return f"{value:.4g}"


def summary(plan, report: dict, out, elapsed: float) -> None:
    """The method's own per-model statistics (as its registry entry declares), the
    norms, and one line of totals."""
    c = stderr()
    tot = report["totals"]
    method = plan.method
    per_model = [s for s in method.stats if s.per_model and any(s.key in m for m in tot["models"])]
    t = Table("model", *(s.label for s in per_model), method.l2_label, title=f"{method.title} -> {out}")
    for e, m in zip(plan.recipe.models, tot["models"]):
        t.add_row(Path(e.path).name or e.path, *(_fmt(s, m[s.key]) if s.key in m else "-" for s in per_model),
                  f"{m['l2']:.4g}")
    c.print(t)
    size = sum(f["size"] for f in report["files"].values())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    facts = [f"{s.label}: {_fmt(s, tot[s.key])}" for s in method.stats if not s.per_model and s.key in tot]
    facts += [f"{report['tensors_merged']} tensors merged, {report['tensors_copied']} copied",
              f"{human_bytes(size)} written in {elapsed:.1f} s ({human_bytes(plan.read_bytes / max(elapsed, 1e-9))}/s "
              f"of input)", f"peak RSS {human_bytes(rss, True)}"]
    c.print("; ".join(facts))
    for note in report["notes"]:
        c.print(f"note: {note}")
