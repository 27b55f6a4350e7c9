"""Multi-stage recipes (mergekit-multimerge's format, docs/recipes.md §6): a YAML
file of several documents, each a recipe with a `name:` (one, the final stage, may have
none); a later stage names an earlier one as a model (`model: stage-a`, `base_model`,
a slice source, the tokenizer source).

`npmerge run FILE -o OUT` runs the stages in dependency order (document order where
free): named stages into DIR/NAME (`--intermediate-dir`, default OUT.stages beside OUT),
the unnamed one (else the last document) into OUT. A stage's output is exactly what
`npmerge run` of that one document, its stage names replaced by their directories,
writes. An existing stage output is reused only if its npmerge_recipe.yml is the
stage's and the stage's input files are unchanged since it was written (fingerprints
kept in DIR/.NAME.npmerge-stage.json); otherwise it is merged again, with a note
(mergekit reuses any directory that holds a model).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RecipeError, shown
from .recipe import Recipe
from .recipe_yaml import decode_recipe, load_yaml_documents

MARKER = ".{}.npmerge-stage.json"


@dataclass
class Stage:
    number: int  # document number, from 1
    name: str | None
    data: dict  # the document without `name`
    needs: list[str] = field(default_factory=list)  # the earlier stages it reads, by name

    @property
    def label(self) -> str:
        return f"stage '{self.name}'" if self.name else f"the final stage (document {self.number})"


def read(path) -> list[Stage] | None:
    """The stages of a recipe file in the order they run; None for a plain one-document recipe."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe '{path}': {exc.strerror or exc}") from None
    docs = [d for d in load_yaml_documents(decode_recipe(raw, source), source) if d is not None]
    if len(docs) <= 1 and not (docs and isinstance(docs[0], dict) and "name" in docs[0]):
        return None
    stages = []
    for i, doc in enumerate(docs, 1):
        if not isinstance(doc, dict):
            raise RecipeError(f"{source}, document {i} must be a mapping with name, merge_method, models, ...")
        doc = dict(doc)
        name = doc.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name.strip() or os.sep in name
                                 or name in (".", "..") or name.startswith(".")):
            raise RecipeError(f"{source}, document {i}: name must be a plain directory name, got {shown(name)}",
                              hint="e.g. name: stage-a")
        stages.append(Stage(i, name, doc))
    _check_names(stages, source)
    names = {s.name for s in stages if s.name}
    for s in stages:
        s.needs = sorted({n for ref in _references(s.data) for n in [_stage_of(ref, names)] if n},
                         key=[t.name for t in stages].index)
        _check_unknown(s, names, source)
    last = final(stages)
    readers = [s.label for s in stages if last.name in s.needs]
    if readers:
        raise RecipeError(f"{source}: {', '.join(readers)} read(s) the final stage '{last.name}', which is written to "
                          "-o OUT after every other stage", hint="add a final document without a name, or move the "
                          "stage that is read away from the end of the file")
    return _order(stages, last, source)


def final(stages: list[Stage]) -> Stage:
    """The stage written to OUT: the unnamed one, else the last document."""
    return next((s for s in stages if s.name is None), max(stages, key=lambda s: s.number))


def outputs(stages: list[Stage], out: Path, intermediate: Path | None) -> dict[int, Path]:
    """Where each stage (by document number) is written."""
    folder = intermediate or out.parent / f"{out.name}.stages"
    last = final(stages)
    return {s.number: out if s is last else folder / s.name for s in stages}


def recipe(stage: Stage, stages: list[Stage], paths: dict[int, Path], source: str) -> Recipe:
    """The stage's recipe, earlier stages' names replaced by their output directories."""
    by_name = {s.name: str(paths[s.number]) for s in stages if s.name}
    return Recipe.from_data(_substitute(stage.data, by_name), f"{source} ({stage.label})")


def reusable(recipe_: Recipe, plan, out: Path) -> str | None:
    """Why the existing output `out` of a stage cannot be reused (None: it can)."""
    saved, marker = out / "npmerge_recipe.yml", out.parent / MARKER.format(out.name)
    if not saved.is_file() or not marker.is_file():
        return "it was not written by this stage's merge"
    if saved.read_text("utf-8") != recipe_.to_yaml():
        return "its recipe differs"
    try:
        recorded = json.loads(marker.read_text("utf-8"))
    except (OSError, ValueError):
        return "its record of the inputs is unreadable"
    if recorded != _inputs(plan):
        return "an input changed since"
    return None


def record(plan, out: Path) -> None:
    """Remember the input files a finished stage was merged from (for `reusable`)."""
    (out.parent / MARKER.format(out.name)).write_text(json.dumps(_inputs(plan), indent=1) + "\n", "utf-8")


def _inputs(plan) -> dict:
    fp = plan.fingerprint()
    return {"recipe_sha256": fp["recipe_sha256"], "inputs": fp["inputs"], "vocabulary": fp.get("vocabulary")}


# ------------------------------------------------------------------ references


def _references(data: dict) -> list[str]:
    """Every model reference of a recipe document (as written)."""
    refs = [data.get("base_model"), data.get("tokenizer_source")]
    tok = data.get("tokenizer")
    if isinstance(tok, dict):
        refs.append(tok.get("source"))
    for entry in data.get("models") or []:
        if isinstance(entry, dict):
            refs.append(entry.get("model"))
    for sl in data.get("slices") or []:
        for src in (sl.get("sources") or []) if isinstance(sl, dict) else []:
            if isinstance(src, dict):
                refs.append(src.get("model"))
    return [r for r in refs if isinstance(r, str)]


def _stage_of(ref: str, names: set[str]) -> str | None:
    """The stage a reference names: `name`, or `name+ADAPTER`."""
    head = ref.split("+", 1)[0]
    return head if head in names else None


def _substitute(data, by_name: dict[str, str]):
    """A copy of the document with stage names in model references replaced by paths."""
    def ref(value):
        if not isinstance(value, str):
            return value
        head, plus, tail = value.partition("+")
        return by_name[head] + plus + tail if head in by_name else value

    out = dict(data)
    for key in ("base_model", "tokenizer_source"):
        if key in out:
            out[key] = ref(out[key])
    if isinstance(out.get("tokenizer"), dict) and "source" in out["tokenizer"]:
        out["tokenizer"] = {**out["tokenizer"], "source": ref(out["tokenizer"]["source"])}
    if isinstance(out.get("models"), list):
        out["models"] = [{**e, "model": ref(e.get("model"))} if isinstance(e, dict) and "model" in e else e
                         for e in out["models"]]
    if isinstance(out.get("slices"), list):
        out["slices"] = [{**sl, "sources": [{**src, "model": ref(src.get("model"))}
                                            if isinstance(src, dict) and "model" in src else src
                                            for src in sl["sources"]]}
                         if isinstance(sl, dict) and isinstance(sl.get("sources"), list) else sl
                         for sl in out["slices"]]
    return out


# ------------------------------------------------------------------ checks and order


def _check_names(stages: list[Stage], source: str) -> None:
    seen: dict[str, int] = {}
    for s in stages:
        if s.name is None:
            continue
        if s.name in seen:
            raise RecipeError(f"{source}: two stages are named '{s.name}' (documents {seen[s.name]} and {s.number})",
                              hint="give every stage its own name")
        seen[s.name] = s.number
    unnamed = [s.number for s in stages if s.name is None]
    if len(unnamed) > 1:
        raise RecipeError(f"{source}: documents {', '.join(map(str, unnamed))} have no name; only the final stage "
                          "may have none", hint="name the stages that later stages read: name: stage-a")


def _check_unknown(stage: Stage, names: set[str], source: str) -> None:
    """A reference without a slash that is neither a stage nor an existing path: a misspelled
    stage name (a Hub id always has a slash)."""
    for ref in _references(stage.data):
        head = ref.split("+", 1)[0]
        if head in names or "/" in head or os.path.lexists(os.path.expanduser(head)):
            continue
        raise RecipeError(f"{source}, document {stage.number}: model '{head}' names no stage and no existing path",
                          hint=f"stages: {', '.join(sorted(names)) or 'none named'}")


def _order(stages: list[Stage], last: Stage, source: str) -> list[Stage]:
    """Dependency order, document order among the stages that are ready, the final stage
    last; a cycle is an error."""
    done: set[str] = set()
    todo, order = [s for s in stages if s is not last] + [last], []
    while todo:
        ready = next((s for s in todo if all(n in done for n in s.needs)), None)
        if ready is None:
            names = ", ".join(f"'{s.name}'" for s in todo if s.name)
            raise RecipeError(f"{source}: stages {names} read each other's outputs (a cycle)",
                              hint="a stage can only read stages that do not read it")
        order.append(ready)
        todo.remove(ready)
        if ready.name:
            done.add(ready.name)
    return order
