"""Helpers for the bad-input catalogue and the interrupt/resume tests: run the CLI
in-process or as a slowed subprocess, check the error lines, and check that nothing
(no output, no staging, no temporary file) was left behind."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.numpy import save_file

from helpers import LLAMA_F32, load_model
from npmerge import cli


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def first(self) -> str:
        return self.err.splitlines()[0] if self.err else ""


def run(*args) -> Result:
    """`npmerge ARGS` in this process (fast); same entry point as the console script."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    return Result(code, out.getvalue(), err.getvalue())


def assert_error(res: Result, code: int, *phrases: str, hint: bool = True) -> None:
    """Exit code, one `Error:` line first naming what is wrong, a `Hint:` line, no traceback."""
    assert res.code == code, res.err
    assert res.err.startswith("Error: "), res.err
    for phrase in phrases:
        assert phrase in res.first, (phrase, res.first)
    assert "Traceback" not in res.err
    assert ("\nHint: " in res.err) == hint, res.err


def litter(root: Path) -> list[str]:
    """Staging dirs, set-aside outputs and temporary files anywhere under root."""
    return [str(p) for p in Path(root).rglob("*") if ".npmerge-" in p.name or p.name.endswith(".tmp")]


def assert_clean(root: Path, before: set[str]) -> None:
    assert set(os.listdir(root)) == before
    assert litter(root) == []


def mk(header, data: bytes = b"", n: int | None = None) -> bytes:
    """safetensors bytes from a header (dict -> compact JSON, or raw bytes) and data."""
    hb = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(hb) if n is None else n) + hb + data


def ent(dtype="F32", shape=(1,), offs=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


def make_model(path: Path, tensors: dict | None = None, config: dict | None = None,
               src: Path = LLAMA_F32 / "ft-a") -> Path:
    """A single-file model dir: `tensors` (default: src's) and src's config.json updated by `config`."""
    path.mkdir(parents=True)
    save_file(load_model(src) if tensors is None else tensors, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config or {})
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def snapshot(*dirs: Path) -> dict[str, tuple]:
    """sha256, size and mtime_ns of every file under dirs (to prove inputs are untouched)."""
    out = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.is_file():
                st = p.stat()
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return out


_SLOWED = """\
import sys, time
from npmerge.cli import entry
from npmerge.io.writer import OutputWriter
write = OutputWriter.write
def slowed(self, *args, **kwargs):
    time.sleep(SLOW)
    return write(self, *args, **kwargs)
OutputWriter.write = slowed
sys.argv[0] = "npmerge"
entry()
"""


def start(*args, slow: float = 0.0) -> subprocess.Popen:
    """The real CLI (cli.entry, as the console script) as a subprocess, with `slow` seconds
    of sleep before each data write so the test can interrupt it mid-merge. Ctrl-C is
    restored to its default in the child: a test suite started in the background by a
    shell without job control inherits SIGINT ignored, and so would npmerge (as any
    program, by design)."""
    code = _SLOWED.replace("SLOW", repr(float(slow)))
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"npmerge ended early ({proc.returncode}): {proc.communicate()[1]}")
        assert time.monotonic() < deadline, "timed out waiting for the merge"
        time.sleep(0.01)


def manifest_lines(staging: Path) -> int:
    try:
        return (staging / "manifest.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0
