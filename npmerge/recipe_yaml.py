"""Recipe files as text: decoding their bytes, reading YAML the way mergekit recipes are
written, and writing the re-runnable recipe.

PyYAML implements YAML 1.1, where `5e-1` or `1e3` are strings; recipes mean numbers
(mergekit parses them with pydantic), so they are read as floats here. A key given
twice in one mapping, which PyYAML silently resolves to the last, is an error. Syntax
errors name the line and column. PyYAML is imported on first use only.
"""

from __future__ import annotations

import codecs
import re
from typing import Any

from .errors import RecipeError


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
        YAML 1.1 reads them as strings), and a key given twice in a mapping is an error."""

        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line)
                except TypeError:
                    continue
                if first != key_node.start_mark.line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (first on line {first + 1})", key_node.start_mark)
            return super().construct_mapping(node, deep)

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+|[-+]?\.[0-9][0-9_]*[eE][-+]?[0-9]+)$"),
        list("-+0123456789."))
    return Loader


def load_yaml(text: str, source: str):
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if mark is None:
            raise RecipeError(f"{source} is not valid YAML: {problem}") from None
        lines = text.splitlines()
        line = lines[mark.line] if mark.line < len(lines) else ""
        raise RecipeError(f"{source} is not valid YAML: line {mark.line + 1}, column {mark.column + 1}: {problem}",
                          hint=f"line {mark.line + 1}: {line.strip()!r}" if line.strip() else None) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source} is not valid YAML: {exc}") from None


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


