"""Model references: a local path, or a Hugging Face Hub id resolved from the local cache.

People name models `org/name` (every mergekit recipe on the Hub does) and already have
them in the Hugging Face cache, so an id resolves offline from the layout huggingface_hub
writes:

    <cache>/models--org--name/refs/<revision>           a file holding the commit hash
    <cache>/models--org--name/snapshots/<commit>/...    files, usually symlinks into ../../blobs/

A local path that exists always wins. An id missing from the cache is downloaded only
when huggingface_hub is installed and offline mode is off, and then only safetensors and
companion files, never pickles. Models are shown and recorded by the name the user gave
(never by a snapshot hash path); the resolved commit is kept so a merge can be reproduced.

Importing this module is cheap (standard library only); PyYAML and huggingface_hub load
when used.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidCheckpoint
from ..constants import INDEX_NAME, SINGLE_NAME

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_REVISION = "main"
# What a merge needs besides the weights: config, tokenizer, generation and processor
# files, chat templates, custom code (the files io/companions.py copies from the base).
COMPANION_PATTERNS = ("*.json", "*.model", "*.txt", "*.jinja", "*.py")
FETCH_PATTERNS = ("*.safetensors",) + COMPANION_PATTERNS

_COMMIT = re.compile(r"[0-9a-f]{40}")
# huggingface_hub.utils.validate_repo_id: ASCII letters, digits, '_', '-', '.'; each part
# starts and ends with a letter, digit or '_'; each part has at most 96 characters.
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?", re.ASCII)
_MAX_NAME = 96
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub.constants.ENV_VARS_TRUE_VALUES


@dataclass(frozen=True)
class ModelRef:
    """A model the user named, and where its files are.

    `name` is how to show and record it: the Hub id as given (with `@revision`), or a
    local path relative to the working directory when inside it, else as given. `commit`
    is the snapshot's commit for Hub models (what a report records to reproduce a merge).
    `notes` are things the user should be told (a local directory shadowing an id, a
    download)."""

    path: Path
    name: str
    hub_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.name

    @property
    def card_name(self) -> str:
        """How a model card names it: the Hub id, else the directory (or file) name."""
        return self.hub_id or os.path.basename(os.path.normpath(os.path.abspath(self.path)))

    def as_record(self) -> dict:
        """The facts a report or recipe records (no absolute path: it leaks the user's layout)."""
        return {"name": self.name, "hub_id": self.hub_id, "revision": self.revision, "commit": self.commit}


# -- environment ----------------------------------------------------------------
def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, with huggingface_hub.constants' precedence:
    HF_HUB_CACHE, the legacy HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub,
    ~/.cache/huggingface/hub. (An empty variable counts as unset.)"""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
        cache = os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or, when unset, TRANSFORMERS_OFFLINE) is true, as huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in _TRUE


# -- parsing references ---------------------------------------------------------
def repo_id_problem(repo_id: str) -> str | None:
    """Why `repo_id` is not an `org/name` Hub model id, or None when it is one."""
    parts = repo_id.split("/")
    if len(parts) != 2:
        return "a Hub model id is 'org/name'"
    if not all(_REPO_PART.fullmatch(p) for p in parts):
        return ("ids use ASCII letters, digits, '-', '_' and '.', and start and end with a letter, "
                "digit or '_'")
    if max(map(len, parts)) > _MAX_NAME:
        return f"each part of an id has at most {_MAX_NAME} characters"
    if "--" in repo_id or ".." in repo_id:
        return "'--' and '..' are not allowed in ids"
    if repo_id.endswith(".git"):
        return "an id cannot end in '.git'"
    return None


def revision_problem(revision: str) -> str | None:
    """Why `revision` cannot name a branch, tag or commit, or None. It becomes a path under
    refs/, so nothing that could step outside it is allowed."""
    if not revision:
        return "the revision after '@' is empty"
    if re.search(r"[\x00-\x20\x7f~^:?*\[\\]", revision) or revision.startswith("/") or revision.endswith("/"):
        return f"'{revision}' is not a valid branch, tag or commit name"
    if any(part in ("", ".", "..") or part.startswith(".") for part in revision.split("/")) or ".." in revision:
        return f"'{revision}' is not a valid branch, tag or commit name"
    return None


def _split_hub_ref(ref: str) -> tuple[str, str | None]:
    repo_id, at, revision = ref.partition("@")
    return repo_id, (revision if at else None)


def _looks_like_id(ref: str) -> bool:
    """Meant as `org/name[@revision]` rather than as a path (one slash, not ./ ../ / ~)."""
    return _split_hub_ref(ref)[0].count("/") == 1 and not ref.startswith((".", "/", "~"))


# -- resolving --------------------------------------------------------------------
def resolve_model(ref: str, *, cwd: Path | None = None, allow_download: bool | None = None) -> ModelRef:
    """Resolve a model reference: an existing local path (relative to `cwd`, default the
    working directory), else a Hub id `org/name[@revision]` from the local cache, downloaded
    when missing if allowed. `allow_download=False` never downloads; None or True download
    when huggingface_hub is installed and HF_HUB_OFFLINE is not set.

    Raises InvalidCheckpoint naming the reference, with a hint (the fetch command for ids)."""
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidCheckpoint(f"empty model reference {ref!r}",
                                hint="give a model directory, a .safetensors file or a Hub id org/name")
    base_dir = Path(os.path.abspath(cwd if cwd is not None else os.getcwd()))
    local = base_dir / os.path.expanduser(ref)
    if os.path.lexists(local):
        return _local_ref(ref, local, base_dir)
    repo_id, revision = _split_hub_ref(ref)
    problem = repo_id_problem(repo_id) or (revision_problem(revision) if revision is not None else None)
    if problem:
        why = f" and is not a Hub model id either ({problem})" if _looks_like_id(ref) else ""
        raise InvalidCheckpoint(f"model path '{ref}' does not exist{why}",
                                hint="check the path; a Hugging Face Hub model is named org/name or "
                                     "org/name@revision")
    return _hub_ref(ref, repo_id, revision, allow_download)


def _local_ref(ref: str, path: Path, base_dir: Path) -> ModelRef:
    snapshot = _snapshot_identity(path)
    if snapshot is not None:  # named by id, not by .../snapshots/<hash>
        repo_id, commit = snapshot
        return ModelRef(path=path, name=f"{repo_id}@{commit}", hub_id=repo_id, revision=commit, commit=commit,
                        notes=(f"a Hugging Face cache snapshot path names {repo_id} at commit {commit}: shown and "
                               f"recorded as {repo_id}@{commit}",))
    notes = ()
    if _looks_like_id(ref):
        repo_id, revision = _split_hub_ref(ref)
        if repo_id_problem(repo_id) is None and (revision is None or revision_problem(revision) is None):
            repo_dir = hub_cache_dir() / _repo_folder(repo_id)
            if (repo_dir / "snapshots").is_dir():
                use = f"{repo_id}@{revision or _some_revision(repo_dir)}"
                notes = (f"'{ref}' is a local path and is used as such; the Hugging Face cache also holds "
                         f"the Hub model {repo_id} (to use that one, write '{use}' or its snapshot path)",)
    return ModelRef(path=path, name=_local_name(ref, path, base_dir), notes=notes)


def _local_name(ref: str, path: Path, base_dir: Path) -> str:
    """Relative to the working directory when inside it (normalised), else as given."""
    absolute = os.path.normpath(str(path))
    root = os.path.normpath(str(base_dir))
    if absolute == root:
        return "."
    if absolute.startswith(root.rstrip(os.sep) + os.sep):
        return os.path.relpath(absolute, root)
    return ref


def _snapshot_identity(path: Path) -> tuple[str, str] | None:
    """(repo_id, commit) when `path` is a cache snapshot directory models--org--name/snapshots/<commit>."""
    parts = Path(os.path.normpath(os.path.abspath(path))).parts
    if len(parts) < 4 or parts[-2] != "snapshots" or not _COMMIT.fullmatch(parts[-1]) or not path.is_dir():
        return None
    kind, _, rest = parts[-3].partition("--")
    org, sep, name = rest.partition("--")
    repo_id = f"{org}/{name}"
    if kind != "models" or not sep or repo_id_problem(repo_id):
        return None
    return repo_id, parts[-1]


def _repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def _hub_ref(ref: str, repo_id: str, revision: str | None, allow_download: bool | None) -> ModelRef:
    cache = hub_cache_dir()
    repo_dir = cache / _repo_folder(repo_id)
    cached = _from_cache(repo_dir, revision or DEFAULT_REVISION)
    missing = None
    if cached is not None:
        commit, snapshot = cached
        missing = _missing_weights(snapshot)
        if missing is None:
            return ModelRef(path=snapshot, name=ref, hub_id=repo_id, revision=revision, commit=commit)
    blocker = _download_blocker(allow_download)
    hint = fetch_hint(repo_id, revision, installed=blocker != _NOT_INSTALLED)
    if blocker is None:
        commit, snapshot = _download(ref, repo_id, revision, cache, hint)
        missing = _missing_weights(snapshot)
        if missing is not None:
            raise InvalidCheckpoint(f"Hub model '{ref}' (commit {commit}) has no safetensors weights npmerge "
                                    f"can use: {missing}",
                                    hint="npmerge reads safetensors only; pick a revision that has them, or "
                                         "convert the model (transformers save_pretrained(..., "
                                         "safe_serialization=True))")
        return ModelRef(path=snapshot, name=ref, hub_id=repo_id, revision=revision, commit=commit,
                        notes=(f"downloaded {ref} (commit {commit}) into the Hugging Face cache",))
    if cached is not None:
        raise InvalidCheckpoint(f"Hub model '{ref}' is in the Hugging Face cache ({cached[1]}) without its "
                                f"weights: {missing}; {blocker}", hint=hint)
    known = _cached_revisions(repo_dir)
    held = f"; the cache holds {repo_id} at {', '.join(known)} only" if known else ""
    which = f"{repo_id} (revision '{revision}')" if revision else repo_id
    raise InvalidCheckpoint(f"'{ref}' is not a local path, and Hub model {which} is not in the Hugging Face "
                            f"cache ({cache}){held}; {blocker}", hint=hint)


def _from_cache(repo_dir: Path, revision: str) -> tuple[str, Path] | None:
    """(commit, snapshot dir) of `revision` in the cache, as huggingface_hub's
    try_to_load_from_cache resolves it: a ref file first, else the revision as a commit."""
    ref_file = repo_dir / "refs" / revision
    if ref_file.is_file():
        try:
            commit = ref_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidCheckpoint(f"cannot read Hugging Face cache ref '{ref_file}': {exc}",
                                    hint="delete it and fetch the model again") from None
        if not _COMMIT.fullmatch(commit):
            raise InvalidCheckpoint(f"Hugging Face cache ref '{ref_file}' does not hold a commit hash",
                                    hint="delete it and fetch the model again")
    elif _COMMIT.fullmatch(revision.lower()):
        commit = revision.lower()
    else:
        return None
    snapshot = repo_dir / "snapshots" / commit
    return (commit, snapshot) if snapshot.is_dir() else None


def _cached_revisions(repo_dir: Path) -> list[str]:
    """Names under refs/ ('main', 'v1.0', 'refs/pr/1'), else the snapshot commits."""
    refs = repo_dir / "refs"
    names = sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []
    if names:
        return names
    snaps = repo_dir / "snapshots"
    return sorted(p.name for p in snaps.iterdir() if p.is_dir()) if snaps.is_dir() else []


def _some_revision(repo_dir: Path) -> str:
    known = _cached_revisions(repo_dir)
    return DEFAULT_REVISION if DEFAULT_REVISION in known or not known else known[0]


def _index_shards(index: Path) -> list[str]:
    """Shard names an index lists (ValueError/OSError when it is not readable JSON of that shape;
    Checkpoint validates the index properly)."""
    data = json.loads(index.read_text(encoding="utf-8"))
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError("no weight_map")
    return list(dict.fromkeys(v for v in weight_map.values() if isinstance(v, str)))


def _missing_weights(snapshot: Path) -> str | None:
    """What keeps a snapshot from being a loadable model, or None. A snapshot often holds
    only config.json (AutoConfig fetched it), or lost blobs to an interrupted download."""
    single, index = snapshot / SINGLE_NAME, snapshot / INDEX_NAME
    if single.exists():
        return None
    if index.exists():
        try:
            shards = _index_shards(index)
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            return None  # a corrupt index: Checkpoint says exactly what is wrong
        absent = [s for s in shards if not (snapshot / s).exists()]
        if not absent:
            return None
        more = ", ..." if len(absent) > 3 else ""
        return f"{len(absent)} of {len(shards)} weight shards are missing ({', '.join(absent[:3])}{more})"
    if os.path.lexists(single) or os.path.lexists(index):
        return "its weights are broken links (an interrupted download, or deleted blobs)"
    try:
        names = sorted(os.listdir(snapshot))
    except OSError as exc:
        return f"it cannot be listed ({exc.strerror})"
    pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        return f"it holds pickle weights only ({', '.join(pickles[:3])}), which npmerge never loads"
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "") if names else "nothing"
    return f"no {SINGLE_NAME} or {INDEX_NAME} (it holds {shown})"


# -- downloading ----------------------------------------------------------------------
_NOT_INSTALLED = "huggingface_hub is not installed, so npmerge cannot download it"


def _download_blocker(allow_download: bool | None) -> str | None:
    """Why npmerge will not download now, or None when it may."""
    if allow_download is False:
        return "downloads are off for this run"
    if hub_offline():
        return "HF_HUB_OFFLINE is set, so npmerge does not download"
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return _NOT_INSTALLED
    return None


def _download(ref: str, repo_id: str, revision: str | None, cache: Path, hint: str) -> tuple[str, Path]:
    """Fetch companions + index first, then exactly the shards the index lists (a pattern
    like *.safetensors would also fetch duplicates such as Mistral's consolidated.safetensors),
    the second call pinned to the first call's commit. Returns (commit, snapshot dir)."""
    import huggingface_hub

    try:
        folder = Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=str(cache), allow_patterns=[SINGLE_NAME, *COMPANION_PATTERNS]))
        commit = folder.name
        try:
            shards = _index_shards(folder / INDEX_NAME) if (folder / INDEX_NAME).is_file() else []
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            shards = []
        if shards:
            folder = Path(huggingface_hub.snapshot_download(
                repo_id, revision=commit, cache_dir=str(cache), allow_patterns=[glob.escape(s) for s in shards]))
    except Exception as exc:  # network, auth, gated or missing repo: all say "could not fetch"
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise InvalidCheckpoint(f"cannot download Hub model '{ref}': {type(exc).__name__}: {reason}",
                                hint=hint) from None
    if not _COMMIT.fullmatch(folder.name):
        raise InvalidCheckpoint(f"download of Hub model '{ref}' gave '{folder}', not a cache snapshot", hint=hint)
    return folder.name, folder


def _installed_version(dist: str) -> tuple[int, ...] | None:
    from importlib import metadata

    try:
        text = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
    return tuple(int(n) for n in re.findall(r"\d+", text.split("+")[0])[:2]) or None


def fetch_command(repo_id: str, revision: str | None = None) -> str:
    """The shell command that puts `repo_id` (safetensors + companions, no pickles) in the cache,
    spelled for the installed huggingface_hub: `hf` >= 1.0 repeats --include (click options);
    0.34-0.x `hf` and older `huggingface-cli` take several patterns after one --include (argparse
    nargs='*', where a repeated flag keeps only its last value)."""
    version = _installed_version("huggingface_hub")
    head = f"download {shlex.quote(repo_id)}" + (f" --revision {shlex.quote(revision)}" if revision else "")
    patterns = [shlex.quote(p) for p in FETCH_PATTERNS]
    if version is None or version >= (1, 0):
        return f"hf {head} " + " ".join(f"--include {p}" for p in patterns)
    tool = "hf" if version >= (0, 34) else "huggingface-cli"
    return f"{tool} {head} --include " + " ".join(patterns)


def fetch_hint(repo_id: str, revision: str | None = None, *, installed: bool = True) -> str:
    """The hint for an id that is not usable from the cache."""
    how = f"fetch it with: {fetch_command(repo_id, revision)}"
    if not installed:
        how += (" (pip install 'npmerge[hub]' installs the hf command, and lets npmerge download it "
                "itself unless HF_HUB_OFFLINE is set)")
    return how + "; if you meant a local directory, check the path"


# -- model card metadata ------------------------------------------------------------------
def card_metadata(base: ModelRef | None, models: list[ModelRef], method_name: str, *,
                  library_name: str | None = "transformers") -> dict:
    """Model-card front matter for a merge, following the Hub's conventions
    (huggingface.co/docs/hub/model-cards, "Specifying a base model"): `base_model` is the
    list of Hub ids the merge was made from (base first, then the merged models, each once,
    without @revision) with `base_model_relation: merge`. Models without a Hub id are left
    out of `base_model` (the Hub validates it as model ids; a directory name is not one) and
    named in the card text by `ModelRef.card_name`. Tags: merge, npmerge and the method."""
    ids = list(dict.fromkeys(m.hub_id for m in ([base] if base is not None else []) + list(models) if m.hub_id))
    method = re.sub(r"[\s_]+", "-", method_name.strip().lower())
    if not method:
        raise ValueError("method_name is empty")
    meta: dict = {}
    if ids:
        meta["base_model"] = ids
        meta["base_model_relation"] = "merge"
    if library_name:
        meta["library_name"] = library_name
    meta["tags"] = list(dict.fromkeys(["merge", "npmerge", method]))
    return meta


# Plain scalars a YAML 1.2 core-schema parser reads as non-strings but PyYAML (YAML 1.1)
# leaves unquoted, e.g. 1e3 (float), 0o17 (octal), .NaN.
_YAML12_NON_STRING = re.compile(
    r"(?:~|null|Null|NULL|true|True|TRUE|false|False|FALSE"
    r"|[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+"
    r"|[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))\Z")


def card_yaml(metadata: dict) -> str:
    """`metadata` as YAML front matter (between '---' lines). Strings any YAML 1.1 or 1.2
    parser would read as another type, or that hold YAML syntax, are quoted."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper, value):
        style = "'" if _YAML12_NON_STRING.match(value) else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    body = yaml.dump(metadata, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False,
                     width=1 << 30)
    return f"---\n{body}---\n"
