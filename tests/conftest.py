import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import reference`
FIXTURES = ROOT / "fixtures"
# No network in tests: a Hub id missing from the cache is never downloaded (huggingface_hub
# may be installed). Tests of the download path monkeypatch a fake huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
