import fcntl
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import reference`
FIXTURES = ROOT / "fixtures"
# No network in tests: a Hub id missing from the cache is never downloaded (huggingface_hub
# may be installed). Tests of the download path monkeypatch a fake huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels():
    """Compile every kernel once, before the first test, into the kernel cache the tests'
    own npmerge processes load from. Test workers (pytest-xdist) take turns: the first
    compiles, the others find the cache filled."""
    from npmerge import kernels, warmup

    where = Path(kernels.ensure_cache_dir() or tempfile.gettempdir())
    where.mkdir(parents=True, exist_ok=True)
    with open(where / ".npmerge-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        warmup.compile_kernels()
