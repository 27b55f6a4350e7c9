"""The minimal container (Containerfile), replayed without a container runtime.

The image installs npmerge, compiles the kernels at build time (`npmerge warmup`, as
root, into the package's own __pycache__) and runs as a non-root user, usually with a
read-only root filesystem. Here: the package copied into a fresh prefix (what `pip
install` lays down for a pure-Python package), the demo's kernels compiled there, the
prefix and HOME made read-only (run as root, the merges run without the capabilities
that let root write anywhere: `setpriv`), then:

* the README's demo merge compiles nothing: the overlay in the temp dir holds only links
  to the image's compiled kernels;
* another CPU (NUMBA_CPU_NAME=generic changes the key numba files compiled code under)
  compiles into the temp dir with a note, image untouched;
* nothing writable at all (every candidate directory refused): compiled in memory with a
  note; the same bytes as the fallback above.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import FIXTURES, ROOT

MODELS = [str(FIXTURES / "tiny-llama" / m) for m in ("base", "ft-a", "ft-b", "ft-c")]
DEMO = ["ties", *MODELS, "--density", "0.2"]
SMALL = ["passthrough", MODELS[1], "--scale", "0.5"]  # the fallbacks compile (by design): the smallest kernel
AS_USER = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"] if os.getuid() == 0 else []


def _compiled_kernels() -> list[Path]:
    """The files of this checkout's kernel cache (numba keys them by a hash of the source,
    so a copy of the package can use them)."""
    from npmerge import kernels

    where = Path(kernels.ensure_cache_dir() or kernels.IN_TREE)
    if where != kernels.IN_TREE:
        where = where / kernels.numba_subdir(kernels.IN_TREE.parent)
    return [p for p in where.glob("*") if p.suffix in (".nbi", ".nbc")] if where.is_dir() else []


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


NOTHING_WRITABLE = ("import sys, npmerge.kernels as K; K._writable = lambda path: False; "
                    "from npmerge.cli import main; sys.argv[0] = 'npmerge'; main()")


def _run(args, env, as_user: bool = False, writable: bool = True) -> subprocess.CompletedProcess:
    """npmerge in a subprocess; `as_user`: as a user whom file permissions bind (root without
    its override capabilities)."""
    python = [sys.executable, "-m", "npmerge"] if writable else [sys.executable, "-c", NOTHING_WRITABLE]
    return subprocess.run([*(AS_USER if as_user else []), *python, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600, cwd="/")


@pytest.mark.skipif(os.getuid() == 0 and not shutil.which("setpriv"), reason="root, and no setpriv to drop its "
                    "override of file permissions")
def test_read_only_image_cache():
    root = Path(tempfile.mkdtemp(prefix="npmerge-image-"))
    try:
        os.chmod(root, 0o755)
        site = root / "site"
        shutil.copytree(ROOT / "npmerge", site / "npmerge", ignore=shutil.ignore_patterns("__pycache__"))
        home, tmp, out = root / "home", root / "tmp", root / "out"
        for d in (home, tmp, out):
            d.mkdir()
        os.chmod(tmp, 0o1777)
        os.chmod(out, 0o777)
        env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "PYTHONPATH")}
        env.update(PYTHONPATH=str(site), HOME=str(home), TMPDIR=str(tmp))

        baked = site / "npmerge" / "kernels" / "__pycache__"
        baked.mkdir()
        for p in _compiled_kernels():  # what the session compiled: the build loads it instead of compiling again
            shutil.copy2(p, baked / p.name)
        build = _run(["warmup", "--dtype", "bfloat16", "--method", "ties"], env)  # the image build, as root
        assert build.returncode == 0, build.stderr
        assert any(p.suffix == ".nbi" for p in baked.iterdir())
        image = _tree(site)

        for path in (site, home):  # the image is read-only at run time
            for p in [path, *path.rglob("*")]:
                if not p.is_symlink():
                    p.chmod(p.stat().st_mode & ~0o222)
        overlay = tmp / f"npmerge-numba-{os.getuid()}"

        first = _run([*DEMO, "-o", out / "a"], env, as_user=True)
        assert first.returncode == 0, first.stderr
        assert "kernel" not in first.stderr  # nothing compiled, nothing to say
        files = [p for p in overlay.rglob("*") if p.suffix in (".nbi", ".nbc")]
        assert files and all(p.is_symlink() for p in files), [p for p in files if not p.is_symlink()]

        other_cpu = _run([*SMALL, "-o", out / "b"], dict(env, NUMBA_CPU_NAME="generic"), as_user=True)
        assert other_cpu.returncode == 0, other_cpu.stderr
        assert "lacks kernels this machine needs" in other_cpu.stderr and str(overlay) in other_cpu.stderr
        assert any(p.suffix == ".nbi" and not p.is_symlink() for p in overlay.rglob("*"))

        nowhere = _run([*SMALL, "-o", out / "c"], env, as_user=True, writable=False)
        assert nowhere.returncode == 0, nowhere.stderr
        assert "kernels were compiled in memory" in nowhere.stderr

        model = "model.safetensors"
        assert (out / "b" / model).read_bytes() == (out / "c" / model).read_bytes()
        assert _tree(site) == image
    finally:
        for p in [root, *root.rglob("*")]:
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | 0o700)
        shutil.rmtree(root, ignore_errors=True)
