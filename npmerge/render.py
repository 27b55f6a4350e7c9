"""Human output of the CLI (rich). Results go to stdout, so they can be piped and paged
(`npmerge info M | less`, `--dry-run > plan.txt`): info, the dry-run plan, the final
summary. Progress and diagnostics (notes; `Error:`/`Hint:` lines, cli.py) go to stderr."""

from __future__ import annotations

import contextlib
import json
import resource

import numpy as np

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.table import Table

from .plan_params import layer_table
from .report import model_records
from .units import human_bytes

_consoles: dict[bool, Console] = {}


def _console(err: bool) -> Console:
    if err not in _consoles:
        _consoles[err] = Console(stderr=err, highlight=False)
    return _consoles[err]


def stdout() -> Console:
    """Where results go."""
    return _console(False)


def stderr() -> Console:
    """Where progress and diagnostics go."""
    return _console(True)


def notes(lines) -> None:
    for line in lines:
        stderr().print(f"note: {escape(line)}", soft_wrap=True)


def info(data: dict, tensors: bool) -> None:
    c = stdout()
    table = Table(title=escape(str(data["name"])), show_header=False)
    if data.get("hub_id"):
        table.add_row("commit", str(data["commit"]))
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
            t.add_row(escape(row["name"]), row["dtype"], str(row["shape"]), escape(row["file"]))
        c.print(t)


def adapter_info(data: dict) -> None:
    """`npmerge info ADAPTER`: what the adapter does, not its raw tensors."""
    a = data["adapter"]
    t = Table(title=escape(f"{data['path']} (PEFT LoRA adapter)"), show_header=False)
    t.add_row("type", a["type"] + (", fan_in_fan_out" if a["fan_in_fan_out"] else ""))
    t.add_row("base model", str(a["base_model_name_or_path"] or "-"))
    t.add_row("r", f"{a['r']}" + (f" (per module: {', '.join(map(str, a['ranks']))})" if a["ranks"] != [a["r"]] else ""))
    t.add_row("lora_alpha", f"{a['lora_alpha']:g}")
    t.add_row("scale", ", ".join(f"{s:.6g}" for s in a["scales"]) or f"{a['scale']:.6g}")
    for key in ("rank_pattern", "alpha_pattern"):
        if a[key]:
            t.add_row(key, ", ".join(f"{k}: {v}" for k, v in a[key].items()))
    targets = a["target_modules"]
    t.add_row("target modules", targets if isinstance(targets, str) else ", ".join(targets or []) or "-")
    t.add_row("adapted modules", f"{len(a['adapted_modules'])}")
    t.add_row("modules_to_save", ", ".join(a["modules_to_save"] or []) or "-")
    if a["replaced_tensors"]:
        t.add_row("replaced tensors", f"{len(a['replaced_tensors'])}")
    t.add_row("bias", a["bias"] + (", lora_bias" if a["lora_bias"] else ""))
    t.add_row("stored", f"{a['tensors']:,} tensors, {a['parameters']:,} parameters, {', '.join(a['dtypes'])}")
    stdout().print(t)


# -- the plan (--dry-run) ------------------------------------------------------------------
def _tensor_rows(plan) -> list[dict]:
    return [{"name": j.name, "shape": list(j.shape), "in_dtypes": [s.dtype for s in j.sources], "out_dtype": j.out_dtype,
             "copy": j.copy, "passes": j.passes} for j in plan.jobs]


def _dtypes(row: dict) -> str:
    return "/".join(dict.fromkeys(row["in_dtypes"]))


def plan_dict(plan, out) -> dict:
    base, models = model_records(plan, public=False)
    check = plan.output
    read = plan.read_bytes
    return {
        "method": plan.method.name,
        "base": base,
        "models": models,
        "parameters": plan.global_params,
        "out": str(check.out if check else out),
        "output": None if check is None else {
            "replaces": check.replaces, "resumed_shards": check.resumed, "shards": check.shards,
            "space_needed": check.need, "space_free": check.free},
        "tensors_merged": sum(1 for j in plan.jobs if not j.copy),
        "tensors_copied": sum(1 for j in plan.jobs if j.copy),
        "tensors": _tensor_rows(plan),
        "shards": [s.filename for s in plan.layout.shards],
        "one_file": plan.one_file,
        "read_bytes": read,
        "streamed_bytes": plan.total_work,
        "input_passes": plan.total_work / read if read else 0.0,
        "write_bytes": sum(s.size for s in plan.layout.shards),
        "memory_budget": plan.budget,
        "working_memory": plan.work_bytes,
        "span_elements": plan.span,
        "threads": plan.threads,
        "notes": plan.notes,
        "parameter_table": layer_table(plan),
    }


def plan(plan, out) -> None:
    """Every tensor (input and output dtypes, passes), then the plan's figures."""
    d = plan_dict(plan, out)
    c = stdout()
    tensors = Table("tensor", "shape", "in", "out", "passes", title="tensors")
    tensors.columns[0].overflow = "fold"
    for row in d["tensors"]:
        tensors.add_row(escape(row["name"]), "x".join(map(str, row["shape"])) or "scalar", _dtypes(row),
                        row["out_dtype"], "copy" if row["copy"] else f"<= {row['passes']}")
    c.print(tensors)

    t = Table(title=escape(f"npmerge plan: {d['method']} -> {d['out']}"), show_header=False)
    if d["base"]:
        t.add_row("base", escape(_named(d["base"])))
    for i, m in enumerate(d["models"]):
        t.add_row(f"model {i + 1}", escape(_named(m)) + "  " + ", ".join(f"{k}={v}" for k, v in m["parameters"].items()))
    t.add_row("parameters", ", ".join(f"{k}={v}" for k, v in d["parameters"].items()) or "-")
    groups: dict[str, int] = {}
    for row in d["tensors"]:
        key = f"{_dtypes(row)} copied" if row["copy"] else f"{_dtypes(row)} -> {row['out_dtype']}"
        groups[key] = groups.get(key, 0) + 1
    t.add_row("tensors", f"{d['tensors_merged']} merged, {d['tensors_copied']} copied; "
                         + ", ".join(f"{k} ({n})" for k, n in groups.items()))
    t.add_row("reads", f"{human_bytes(d['read_bytes'])} of input, at most {d['input_passes']:.2f} passes over it "
                       f"({human_bytes(d['streamed_bytes'])} streamed)")
    t.add_row("memory", f"{human_bytes(d['working_memory'], True)} working buffers (budget "
                        f"{human_bytes(d['memory_budget'], True)}), spans of up to {d['span_elements']:,} elements")
    t.add_row("threads", str(d["threads"]))
    what = "one .safetensors file (recipe and summary in its header)" if d["one_file"] else f"{len(d['shards'])} shard(s)"
    t.add_row("output", f"{what}, {human_bytes(d['write_bytes'])}")
    check = d["output"]
    if check is not None:
        kind = "file" if d["one_file"] else "directory"
        state = (f"replaces the existing {kind} (--force)" if check["replaces"] else
                 f"resumes: {check['resumed_shards']} of {check['shards']} shard(s) finished" if check["resumed_shards"]
                 else "new")
        t.add_row(f"output {'file' if d['one_file'] else 'dir'}", escape(f"{d['out']} ({state})"))
        free = "" if check["space_free"] is None else f", {human_bytes(check['space_free'])} free"
        t.add_row("disk", f"needs {human_bytes(check['space_needed'])}{free}")
    c.print(t)
    if d["parameter_table"]:
        rows = d["parameter_table"]
        p = Table("tensors", *map(escape, rows[0]["values"]), title="parameters that vary per tensor")
        for row in rows:
            p.add_row(escape(row["tensors"]), *row["values"].values())
        c.print(p)


def _named(record: dict) -> str:
    return record["name"] + (f" (commit {record['commit']})" if record.get("commit") else "")


# -- a run ------------------------------------------------------------------------------------
def progress(plan, disable: bool):
    return progress_bar(plan.method.name, plan.total_work, disable)


@contextlib.contextmanager
def progress_bar(label: str, total: int, disable: bool):
    """A bar on stderr advanced by bytes of input; yields advance(nbytes, name)."""
    # Only on a terminal: in a log or pipe a bar is noise, and `Error:` must stay the first line.
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=stderr(),
                   disable=disable or not stderr().is_terminal, transient=False)
    with bar:
        task = bar.add_task(label, total=total)

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
    norms, and one line of totals; models by the names the user gave."""
    c = stdout()
    tot = report["totals"]
    method = plan.method
    per_model = [s for s in method.stats if s.per_model and any(s.key in m for m in tot["models"])]
    t = Table("model", *(s.label for s in per_model), method.l2_label, title=escape(f"{method.title} -> {out}"))
    for model, m in zip(plan.models, tot["models"]):
        t.add_row(escape(model.label), *(_fmt(s, m[s.key]) if s.key in m else "-" for s in per_model),
                  f"{m['l2']:.4g}")
    c.print(t)
    size = sum(f["size"] for f in report["files"].values())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    facts = [f"{s.label}: {_fmt(s, tot[s.key])}" for s in method.stats if not s.per_model and s.key in tot]
    facts += [f"{report['tensors_merged']} tensors merged, {report['tensors_copied']} copied",
              f"{human_bytes(size)} written in {elapsed:.1f} s ({human_bytes(plan.read_bytes / max(elapsed, 1e-9))}/s "
              f"of input)", f"peak RSS {human_bytes(rss, True)}"]
    c.print("; ".join(facts))


def verdict(v) -> None:
    """`npmerge verify`: what matched (stdout); what differs goes to stderr as the error."""
    c = stdout()
    if v.one_file and not v.recomputed:
        c.print(f"header valid: {escape(str(v.out))} is a one-file npmerge output (--recompute proves its bytes)",
                soft_wrap=True)
        return
    recipe = "the recipe in its header" if v.one_file else "npmerge_recipe.yml"
    against = f"a re-run of {recipe} (byte for byte)" if v.recomputed else "merge_report.json (sha256)"
    files = f"{len(v.matched)} file{'s' if len(v.matched) != 1 else ''}"
    if v.ok:
        c.print(f"verified: {files} of {escape(str(v.out))} match {against}", soft_wrap=True)
    else:
        c.print(f"{files} of {escape(str(v.out))} match {against}; "
                f"{len(v.differ) + len(v.missing)} do not", soft_wrap=True)
    if v.extra:
        c.print("not part of the merge: " + escape(", ".join(v.extra)), soft_wrap=True)


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _cos(x) -> str:
    return "-" if x is None else f"{x:+.3f}"


def inspection(data: dict) -> None:
    """`npmerge inspect`: the models; one row per layer (RMS of each task vector, each pair's
    cosine, sign conflicts); then, by density, the share of each model's kept elements
    that the sign election goes against."""
    c = stdout()
    names, n, tot = data["models"], len(data["models"]), data["total"]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    m = Table(title=escape(f"task vectors against {data['base']}"))
    for col, justify in (("#", "right"), ("model", "left"), ("‖τ‖₂", "right"), ("RMS", "right"),
                         ("unchanged tensors", "right")):
        m.add_column(col, justify=justify)
    for i, name in enumerate(names):
        m.add_row(str(i + 1), escape(name), f"{tot['l2'][i]:.4g}", f"{tot['rms'][i]:.3g}", str(len(tot["unchanged"][i])))
    c.print(m)
    t = Table(title="by layer")
    t.add_column("layer")
    t.add_column("RMS (mean)", justify="right")
    for i, j in pairs:
        t.add_column(f"cos {i + 1}·{j + 1}", justify="right")
    t.add_column("conflicts", justify="right")
    for layer, d in [*data["layers"].items(), ("all", tot)]:
        t.add_row(escape(layer), f"{sum(d['rms']) / n:.3g}", *[_cos(d["cosine"][i][j]) for i, j in pairs],
                  _pct(d["sign_conflict"]))
    c.print(t)
    e = Table(title=escape(f"kept elements the sign election ({data['election']}) goes against, by density"))
    e.add_column("density", justify="right")
    for i in range(n):
        e.add_column(f"model {i + 1}", justify="right")
    e.add_column("conflicts", justify="right")
    for k, d in enumerate(data["densities"]):
        e.add_row(f"{d:g}", *[_pct(tot["excluded_by_density"][i][k]) for i in range(n)],
                  _pct(tot["sign_conflict_by_density"][k]))
    c.print(e)
    c.print("conflicts: share of elements whose kept non-zero deltas disagree in sign", style="dim")


def check_plot_target(path) -> None:
    """Before any work: a known image type, and matplotlib installed."""
    from .errors import RecipeError

    if path.suffix.lower() not in (".png", ".svg"):
        raise RecipeError(f"--plot {path}: the file must end in .png or .svg")
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise RecipeError("--plot needs matplotlib, which is not installed",
                          hint="python -m pip install 'npmerge[plot]'")


def inspection_plot(data: dict, path) -> None:
    """A heat map of cosine similarity by layer and pair, and sign conflicts against density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(data["models"])
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    layers = list(data["layers"])
    grid = np.array([[np.nan if d["cosine"][i][j] is None else d["cosine"][i][j] for i, j in pairs]
                     for d in data["layers"].values()], dtype=float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.3 * len(layers) + 1.5)))
    im = left.imshow(grid, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
    left.set_xticks(range(len(pairs)), [f"{i + 1}·{j + 1}" for i, j in pairs])
    left.set_yticks(range(len(layers)), layers)
    left.set_xlabel("pair of models")
    left.set_ylabel("layer")
    left.set_title("cosine similarity of task vectors")
    fig.colorbar(im, ax=left)
    dens = data["densities"]
    for i, name in enumerate(data["models"]):
        right.plot(dens, data["total"]["excluded_by_density"][i], marker="o", label=f"{i + 1} {name}")
    right.plot(dens, data["total"]["sign_conflict_by_density"], marker="s", linestyle="--", color="black",
               label="all: sign conflicts")
    right.set_xlabel("density")
    right.set_ylabel("share of kept elements (conflicts: of all)")
    right.set_title(f"against the elected sign ({data['election']})")
    right.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None} if str(path).lower().endswith(".png") else None)
    plt.close(fig)


def part_done(record: dict, done: list[int], out, json_out: bool, quiet: bool) -> None:
    """A part of a merge split into parts: what it wrote, and which parts are finished."""
    i, n = record["part"]
    if json_out:
        print(json.dumps({**record, "parts_done": done}, indent=2))
        return
    if quiet:
        return
    files = record["files"]
    stdout().print(f"part {i}/{n} done: {len(files)} shard(s), {human_bytes(sum(f['size'] for f in files.values()))}; "
                   f"{len(done)} of {n} parts finished"
                   + (f"; now: npmerge assemble {escape(str(out))}" if len(done) == n else ""), soft_wrap=True)


def extract_summary(report: dict, out, elapsed: float) -> None:
    """extract-lora's result: one row per low-rank module, the tensors saved whole, totals."""
    c = stdout()
    t = Table("module", "shape", "rank", "energy kept", "rel. error", "optimum", title=escape(f"LoRA -> {out}"))
    for module, m in report["modules"].items():
        t.add_row(escape(module), "x".join(map(str, m["shape"])), str(m["rank"]), f"{m['energy']:.6f}",
                  f"{m['error']:.3e}", f"{m['optimal_error']:.3e}")
    for name, w in report["saved_whole"].items():
        t.add_row(escape(name), "", f"saved whole ({escape(w['kind'])})", "", "", "")
    c.print(t)
    tot = report["totals"]
    skipped = {why: len(names) for why, names in report["skipped"].items()}
    size = sum(f["size"] for f in report["files"].values())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    facts = [f"{tot['lowrank']} low-rank modules, {tot['whole']} tensors saved whole"]
    facts += ["skipped: " + ", ".join(f"{n} {why}" for why, n in skipped.items())] if skipped else []
    facts += [f"energy kept {tot['energy']:.6f}, relative error {tot['error']:.3e}",
              f"{human_bytes(size)} written in {elapsed:.1f} s", f"peak RSS {human_bytes(rss, True)}"]
    c.print("; ".join(facts))


def extract_plan(data: dict) -> None:
    """extract-lora --dry-run: what each selected tensor becomes and the memory it takes."""
    c = stdout()
    t = Table("tensor", "shape", "becomes", "max rank", "memory",
              title=escape(f"extract-lora {data['base']} {data['fine_tune']} -> {data['out']}"))
    for i in data["tensors"]:
        becomes = f"LoRA ({i['kind']})" if i["lowrank"] else f"whole if changed ({i['kind']})"
        t.add_row(escape(i["tensor"]), "x".join(map(str, i["shape"])), becomes,
                  str(i["max_rank"]) if i["max_rank"] else "", human_bytes(i["memory"], True))
    c.print(t)
    skipped = "; ".join(f"{len(v)} {why}" for why, v in data["skipped"].items())
    c.print(f"output dtype {data['out_dtype']}; {data['threads']} thread(s) within --max-memory "
            f"{human_bytes(data['max_memory'], True)}" + (f"; left out: {skipped}" if skipped else ""))
