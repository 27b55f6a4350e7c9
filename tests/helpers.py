"""Shared test helpers: run the CLI, load checkpoints through the official library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 so the official library can load BF16)
import numpy as np
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
LLAMA = FIXTURES / "tiny-llama"
LLAMA_F32 = FIXTURES / "tiny-llama-f32"


def npmerge(*args, env=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (as a user would)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "npmerge", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"npmerge {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def load_model(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a model dir or file, via the official safetensors library, as float32 for floats."""
    path = Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
        files = [path / f for f in files]
    else:
        files = [path]
    out = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16 else a


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}
