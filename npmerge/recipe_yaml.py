"""Recipe files as text: decoding their bytes, reading YAML the way mergekit recipes are
written, and writing the re-runnable recipe.

PyYAML implements YAML 1.1, where `5e-1` or `1e3` are strings; recipes mean numbers
(mergekit parses them with pydantic), so they are read as floats here. A key given
twice in one mapping, which PyYAML silently resolves to the last, is an error; merge
keys (`<<: *defaults`) work as in mergekit's `yaml.safe_load`. Syntax errors name the
line and column. A recipe is small: nesting deeper than MAX_DEPTH levels, or aliases
that expand the document beyond MAX_NODES values (a "billion laughs"), are refused
before anything is built from it. PyYAML is imported on first use only.
"""

from __future__ import annotations

import codecs
import re
from typing import Any

from .errors import RecipeError, shown

MAX_DEPTH = 64  # nesting levels of a recipe (a real one has under 10)
MAX_NODES = 100_000  # values of a recipe with every alias expanded (a real one has under 1,000)


def decode_recipe(data: bytes, source: str) -> str:
    """Recipe bytes -> text: UTF-8 (a BOM is dropped) or UTF-16 with a BOM; else an error
    naming the file and what it seems to be."""
    hint = "save the recipe as UTF-8"
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise RecipeError(f"recipe '{source}' is UTF-32 encoded, which npmerge does not read", hint=hint)
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise RecipeError(f"recipe '{source}' starts with a UTF-16 byte-order mark but is not valid UTF-16 "
                              f"({exc.reason} at byte {exc.start})", hint=hint) from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    if b"\x00" in data[:4096]:
        raise RecipeError(f"recipe '{source}' contains NUL bytes: UTF-16 or UTF-32 without a byte-order mark?",
                          hint=hint)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise RecipeError(f"recipe '{source}' is not UTF-8: byte 0x{data[exc.start]:02x} on line {line} "
                          "(a legacy encoding such as Windows-1252 or Latin-1?)", hint=hint) from None


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """PyYAML's safe loader, plus: numbers such as 5e-1 or 1e3 are floats (YAML 1.2;
        YAML 1.1 reads them as strings), a key given twice in a mapping is an error, and
        the document's depth and expanded size are bounded (the module docstring)."""

        depth = 0

        def compose_node(self, parent, index):
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH:
                    raise yaml.composer.ComposerError(None, None, f"nesting deeper than {MAX_DEPTH} levels",
                                                      self.peek_event().start_mark)
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def get_single_node(self):
            node = super().get_single_node()
            if node is not None:
                _check_size(node, yaml)
            return node

        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged below, overridable
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line)
                except TypeError:
                    continue
                if first != key_node.start_mark.line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {shown(key)} is given twice (first on line {first + 1})",
                        key_node.start_mark)
            return super().construct_mapping(node, deep)

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+|[-+]?\.[0-9][0-9_]*[eE][-+]?[0-9]+)$"),
        list("-+0123456789."))
    return Loader


def _check_size(root, yaml) -> None:
    """Refuse a document whose values, every alias expanded, exceed MAX_NODES (aliases
    share nodes, so each distinct node is sized once)."""
    sizes: dict[int, int] = {}

    def size(node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        sizes[id(node)] = 1  # a node within itself (a recursive alias) counts once
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(n) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            total = 1
        sizes[id(node)] = total = min(total, MAX_NODES + 1)
        return total

    if size(root) > MAX_NODES:
        raise yaml.composer.ComposerError(None, None, f"aliases expand it to more than {MAX_NODES:,} values",
                                          root.start_mark)


def load_yaml(text: str, source: str):
    return _load(text, source, False)


def load_yaml_documents(text: str, source: str) -> list:
    """Every document of a YAML stream (`---` between them): a multi-stage recipe."""
    return _load(text, source, True)


def _load(text: str, source: str, documents: bool):
    import yaml

    try:
        if documents:
            return list(yaml.load_all(text, Loader=_yaml_loader()))  # noqa: S506 (a SafeLoader subclass)
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if mark is None:
            raise RecipeError(f"{source} is not valid YAML: {problem}") from None
        lines = text.splitlines()
        line = lines[mark.line] if mark.line < len(lines) else ""
        raise RecipeError(f"{source} is not valid YAML: line {mark.line + 1}, column {mark.column + 1}: {problem}",
                          hint=f"line {mark.line + 1}: {shown(line.strip())}" if line.strip() else None) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source} is not valid YAML: {exc}") from None
    except RecursionError:  # a structure PyYAML's recursive parts cannot take; the depth check is first
        raise RecipeError(f"{source} is not a recipe: nested too deeply") from None


def plain(setting: Any) -> Any:
    """A normalised setting as YAML data (filter entries without a filter lose the key)."""
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        return [({"filter": e["filter"]} if e["filter"] is not None else {}) | {"value": plain(e["value"])}
                for e in setting]
    return setting


def with_params(node: dict, params: dict) -> dict:
    if params:
        node["parameters"] = {k: plain(v) for k, v in params.items()}
    return node


def dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        """Lists of scalars (gradients, layer ranges) in flow style, like mergekit."""

    def represent_list(dumper, data):
        flow = all(not isinstance(e, (list, dict)) for e in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    Dumper.add_representer(list, represent_list)
    return Dumper


