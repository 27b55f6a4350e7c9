"""A recipe's `chat_template:`: a built-in name, `auto` or a literal Jinja template, as
mergekit 0.1.5 reads it, resolved to the template text and written where transformers
reads it (docs/recipes.md §4).

The built-in templates (npmerge/_data/chat_templates) are mergekit's own files, byte for
byte. mergekit's rules for a value: a short single-line string without `{` is a
built-in name; anything else must look like a template (at least 20 characters, with a
`{`). `auto` takes the template most input models share (as transformers loads it,
stripped); on a tie the first in recipe order (base first), where mergekit's choice
follows a set's order.
"""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path

from .errors import InvalidCheckpoint, RecipeError, shown

BUILTIN = ("alpaca", "chatml", "exaone", "llama3", "mistral")
JINJA = "chat_template.jinja"
CONFIG = "tokenizer_config.json"


def check(value) -> str:
    """The recipe value, validated: `auto`, a built-in name or a literal template."""
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"chat_template must be a template name or a Jinja template, got {shown(value)}",
                          hint=_known())
    if value == "auto" or _is_name(value) and value in BUILTIN:
        return value
    if _is_name(value):
        raise RecipeError(f"unknown chat template {shown(value)}", hint=_known())
    if len(value) < 20:
        raise RecipeError(f"chat template {shown(value)} is too short for a Jinja template (mergekit's rule: "
                          "20 characters or more)", hint=_known())
    return value


def _is_name(value: str) -> bool:
    return len(value) < 256 and "\n" not in value and "{" not in value


def _known() -> str:
    return f"known: {', '.join(BUILTIN)}, auto (the template most input models share), or a Jinja template"


def builtin(name: str) -> str:
    return resources.files(__package__).joinpath("_data", "chat_templates", f"{name}.jinja").read_text("utf-8")


def model_template(model_dir: Path | None) -> str | None:
    """The chat template transformers loads for a model directory: chat_template.jinja,
    else tokenizer_config.json's `chat_template` (a list of named templates: "default")."""
    if model_dir is None:
        return None
    jinja = Path(model_dir) / JINJA
    if jinja.is_file():
        return jinja.read_text("utf-8")
    config = Path(model_dir) / CONFIG
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text("utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def resolve(value: str, model_dirs: list[Path | None], notes: list[str]) -> str | None:
    """The template text for a checked recipe value; None when `auto` finds no template
    among the models (noted: the output keeps its tokenizer source's)."""
    if value == "auto":
        found = [t.strip() for t in (model_template(d) for d in model_dirs) if t]
        if not found:
            notes.append("chat_template: auto found no chat template in the input models: the output keeps the "
                         "tokenizer files as they are")
            return None
        return Counter(found).most_common(1)[0][0]
    return builtin(value) if value in BUILTIN else value


def apply(files: dict[str, bytes], template: str, notes: list[str]) -> dict[str, bytes]:
    """The output's tokenizer files with `template` in chat_template.jinja, and the
    `chat_template` of tokenizer_config.json and of a processor's chat_template.json (if
    they have one) replaced by the same text, so that every reader sees one template."""
    out = dict(files)
    out[JINJA] = template.encode("utf-8")
    for name in (CONFIG, "chat_template.json"):
        if name not in out:
            continue
        try:
            config = json.loads(out[name].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise InvalidCheckpoint(f"the tokenizer file {name} is not valid JSON: {e}",
                                    hint="fix the tokenizer files of the model the output takes them from") from None
        if isinstance(config, dict) and "chat_template" in config:
            config["chat_template"] = template
            out[name] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    if CONFIG not in out:
        notes.append("chat_template: the output has no tokenizer files; the template is written to "
                     "chat_template.jinja alone")
    return out
