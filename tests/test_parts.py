"""A merge split into parts (issue 22): `--part I/N` then `npmerge assemble OUT` gives the
same bytes as one machine, whatever the order, concurrency or interruptions of the parts;
assemble refuses missing, foreign or tampered parts and writes nothing then."""

from __future__ import annotations

import json
import shutil
import signal
import os
import subprocess
import sys

import pytest

from helpers import FIXTURES, LLAMA, tree_bytes
from safety_helpers import start, wait_for
from test_cli_habits import cli

M = [str(LLAMA / n) for n in ("base", "ft-a", "ft-b", "ft-c")]
SHARDS = ("--shard-size", "100KB")  # the tiny Llama in 5 shards
RAY = os.path.join(os.path.dirname(sys.executable), "ray")  # the CLI installed with the test extras
MERGES = {
    "ties": ["ties", *M, "-d", "0.3"],
    "dare": ["dare-ties", *M, "-d", "0.5", "--seed", "7"],
    "slerp": ["slerp", M[1], M[2], "-t", "0.3"],
    "slices-tokenizer": ["run", str(FIXTURES.parent / "tests" / "recipes" / "tokenizer-slices.yml")],
}


def here(work, *args):
    """`npmerge ARGS` in `work`, in this process (the console script's entry point; fast)."""
    from test_recipe_corpus import run

    return run(work, *args)


def one_machine(work, merge):
    assert here(work, *MERGES[merge], "-o", "one", *SHARDS, "-q").returncode == 0
    return tree_bytes(work / "one")


def part(work, merge, i, n, *extra, out="split"):
    return here(work, *MERGES[merge], "-o", out, *SHARDS, "--part", f"{i}/{n}", "-q", *extra)


@pytest.fixture
def work(tmp_path):
    (tmp_path / "fixtures").symlink_to(FIXTURES)  # the corpus recipe names fixtures/... from its cwd
    return tmp_path


@pytest.mark.parametrize("merge", list(MERGES))
@pytest.mark.parametrize("n", [1, 3, 7])
def test_parts_in_reverse_order_assemble_to_the_one_machine_bytes(work, merge, n):
    want = one_machine(work, merge)
    if n == 7:
        assert len([f for f in want if f.startswith("model-")]) < 7  # more parts than shards
    for i in range(n, 0, -1):
        proc = part(work, merge, i, n)
        assert proc.returncode == 0, proc.stderr
        assert not (work / "split").exists()
    proc = here(work, "assemble", "split")
    assert proc.returncode == 0, proc.stderr
    assert tree_bytes(work / "split") == want
    assert not (work / ".split.npmerge-parts").exists()


def test_concurrent_parts_and_a_killed_one_rerun(work):
    want = one_machine(work, "ties")
    args = [*MERGES["ties"], "-o", str(work / "split"), *SHARDS]
    procs = [subprocess.Popen([sys.executable, "-m", "npmerge", *args, "--part", f"{i}/3", "-q"], cwd=work,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    killed = start(*args, "--part", "3/3", slow=0.02)
    staging = work / ".split.npmerge-parts" / "part-0003-of-0003"
    wait_for(lambda: any(staging.glob("model-*.tmp")), killed)  # killed while writing a shard
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    proc = cli("assemble", "split", cwd=work)
    assert proc.returncode == 4 and "1 of 3 parts of" in proc.stderr and "3/3" in proc.stderr
    assert "--part 3/3" in proc.stderr and not (work / "split").exists()
    proc = cli(*args, "--part", "3/3", "-q", cwd=work)  # the killed part's staging: rerun with --resume
    assert proc.returncode == 5 and "--resume" in proc.stderr
    proc = cli(*args, "--part", "3/3", "--resume", "-q", cwd=work)
    assert proc.returncode == 0, proc.stderr
    proc = cli("assemble", "split", "--json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["files"] and tree_bytes(work / "split") == want


def test_assemble_refuses_foreign_and_tampered_parts(work):
    for i in (1, 2):
        assert part(work, "ties", i, 2).returncode == 0
    parts = work / ".split.npmerge-parts"
    # a part of another recipe: other densities
    other = [a if a != "0.3" else "0.4" for a in MERGES["ties"]]
    shutil.rmtree(parts / "part-0002-of-0002")
    assert cli(*other, "-o", "split", *SHARDS, "--part", "2/2", "-q", cwd=work).returncode == 0
    proc = cli("assemble", "split", cwd=work)
    assert proc.returncode == 4 and "parts made from another plan than this one" in proc.stderr
    assert "part 2/2: the recipe" in proc.stderr and "density" in proc.stderr
    assert not (work / "split").exists() and (parts / "part-0001-of-0002" / "part.json").is_file()
    # the right part again, then a shard changed after it finished
    shutil.rmtree(parts / "part-0002-of-0002")
    assert part(work, "ties", 2, 2).returncode == 0
    shard = sorted((parts / "part-0002-of-0002").glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    proc = cli("assemble", "split", cwd=work)
    assert proc.returncode == 4 and f"part 2/2: {shard.name} no longer matches its recorded size and sha256" \
        in proc.stderr
    assert not (work / "split").exists()
    # parts of two different splits
    assert part(work, "ties", 1, 3).returncode == 0
    proc = cli("assemble", "split", cwd=work)
    assert proc.returncode == 4 and "different splits (N = 2, 3)" in proc.stderr


def test_part_refusals(work):
    proc = part(work, "ties", 4, 3)
    assert proc.returncode == 2 and "--part must be I/N with 1 <= I <= N" in proc.stderr
    proc = cli(*MERGES["ties"], "-o", "one.safetensors", "--part", "1/2", cwd=work)
    assert proc.returncode == 2 and "a one-file output is one shard" in proc.stderr
    proc = cli("assemble", "nothing", cwd=work)
    assert proc.returncode == 2 and "no finished part of" in proc.stderr
    assert part(work, "ties", 1, 2).returncode == 0
    proc = part(work, "ties", 1, 2)  # done: a plain rerun is refused, --resume redoes nothing
    assert proc.returncode == 5
    assert part(work, "ties", 1, 2, "--resume").returncode == 0


def test_ray_runs_the_parts_on_a_local_cluster_and_stops_at_a_part_s_error(work):
    """A local cluster of 2 CPUs (`ray start`, once: every Ray case is in this test), then
    `--ray auto`: byte-identical to one machine; an npmerge error in one part (NaN in a
    tensor of its shard: not seen by planning, found while merging) stops the merge with
    that part's message and exit code, and nothing is assembled."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    want = one_machine(work, "ties")
    env = {"RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    start_ray = subprocess.run([RAY, "start", "--head", "--num-cpus", "2", "--include-dashboard=false",
                                "--disable-usage-stats"], capture_output=True, text=True, timeout=120)
    assert start_ray.returncode == 0, start_ray.stderr
    try:
        proc = cli(*MERGES["ties"], "-o", "ray-out", *SHARDS, "--ray", "auto", cwd=work, env=env)
        assert proc.returncode == 0, proc.stderr
        assert tree_bytes(work / "ray-out") == want and not (work / ".ray-out.npmerge-parts").exists()
        bad = work / "ft-nan"
        shutil.copytree(LLAMA / "ft-c", bad)
        shard = sorted(bad.glob("model-*.safetensors"))[-1]
        tensors = load_file(str(shard))
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].copy()
        tensors[name].reshape(-1)[0] = np.nan
        save_file(tensors, str(shard), metadata={"format": "pt"})
        proc = cli("ties", *M[:3], str(bad), "-d", "0.3", "-o", "ray-bad", *SHARDS, "--ray", "auto", cwd=work,
                   env=env)
        assert proc.returncode == 4, proc.stderr
        assert "Error: part " in proc.stderr and "NaN/Inf" in proc.stderr and name in proc.stderr
        assert not (work / "ray-bad").exists()
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def test_a_part_killed_while_setting_up_resumes_from_scratch(work):
    """Killed after its staging directory and lock, before its plan.json (a Ray retry runs
    --resume): nothing was written, so --resume starts the part afresh instead of refusing."""
    want = one_machine(work, "ties")
    staging = work / ".split.npmerge-parts" / "part-0001-of-0001"
    staging.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from npmerge.io.staging import LOCK_NAME

    (staging / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": __import__("socket").gethostname(),
                                              "started": "2026-01-01T00:00:00+00:00"}) + "\n")
    assert part(work, "ties", 1, 1).returncode == 5  # a plain rerun still refuses a leftover staging directory
    proc = part(work, "ties", 1, 1, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert here(work, "assemble", "split").returncode == 0 and tree_bytes(work / "split") == want
