"""`--ray [ADDRESS]`: the parts of a merge (npmerge/parts.py) as Ray tasks, then assemble.

Each task runs this very command with `--part I/N --resume` as a subprocess on a Ray
node (same working directory, same Python: the nodes share the filesystem and the
installation, as parts need anyway), with `--threads` CPUs reserved. A task whose
process dies (a crash, a killed node: any exit that is not an npmerge error) is retried
by Ray and resumes the part's finished shards; an npmerge error (bad input, a full disk)
would fail again, so it stops the merge at once with the part's own message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .errors import NpmergeError, RecipeError

RETRIES = 2  # Ray re-runs a task whose process died this many times
_NPMERGE_ERRORS = {2, 3, 4, 5, 6}  # exit codes of npmerge errors: deterministic, not retried


class PartFailed(NpmergeError):
    """A part of a merge on Ray ended with an npmerge error (its exit code is kept)."""

    code = "part_failed"

    def __init__(self, message: str, exit_code: int, hint: str | None = None):
        super().__init__(message, hint)
        self.exit_code = exit_code


def strip_ray(argv: list[str], value: str | None) -> list[str]:
    """The command line without its --ray option (and the address given after it)."""
    out, skip = [], False
    for k, word in enumerate(argv):
        if skip:
            skip = False
            continue
        if word.startswith("--ray="):
            continue
        if word == "--ray":
            skip = value is not None and k + 1 < len(argv) and argv[k + 1] == value
            continue
        out.append(word)
    return out


def connect(address: str | None):
    """ray.init: the cluster at `address` ('auto': the one `ray start` made), else a local one."""
    try:
        import ray
    except ImportError:
        raise RecipeError("--ray needs Ray, which is not installed",
                          hint="python -m pip install 'npmerge[ray]'") from None
    kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address in (None, "", "local"):
        ray.init(**kw)
    else:
        ray.init(address=address, **kw)
    return ray


def run_parts(argv: list[str], parts: int | None, threads: int, shard_count: int, address: str | None,
              progress=None) -> int:
    """Run the command `argv` (npmerge's arguments, without --ray) as N parts on Ray; return N.
    `progress(part_bytes)` is called as each part finishes."""
    ray = connect(address)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = parts or max(1, min(shard_count, cpus // max(threads, 1)))

        @ray.remote(num_cpus=threads, max_retries=RETRIES)
        def part(i: int) -> tuple[int, str, str]:
            cmd = [sys.executable, "-m", "npmerge", *argv, "--part", f"{i}/{n}", "--resume", "--threads",
                   str(threads), "--json"]
            proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
            if proc.returncode not in (0, *_NPMERGE_ERRORS):
                raise RuntimeError(f"part {i}/{n} died ({proc.returncode}): {proc.stderr[-2000:]}")  # Ray retries
            return proc.returncode, proc.stdout, proc.stderr

        cwd, env = os.getcwd(), dict(os.environ)
        pending = {part.remote(i): i for i in range(1, n + 1)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            try:
                code, out, err = ray.get(done[0])
            except Exception as exc:  # retries exhausted
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise PartFailed(f"part {i}/{n} failed {1 + RETRIES} times: {_last_line(str(exc))}", 1) from None
            if code != 0:
                for ref in pending:
                    ray.cancel(ref, force=True)
                message = next((line[7:] for line in err.splitlines() if line.startswith("Error: ")), err.strip())
                hint = next((line[6:] for line in err.splitlines() if line.startswith("Hint: ")), None)
                raise PartFailed(f"part {i}/{n}: {message}", code, hint)
            if progress is not None:
                progress(sum(f["size"] for f in _json(out).get("files", {}).values()))
        return n
    finally:
        ray.shutdown()


def _json(text: str) -> dict:
    try:
        return json.loads(text)
    except ValueError:
        return {}


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text
