"""What `npmerge --version` prints: the versions a bug report needs.

Read from package metadata, never by importing the packages: `--version` must stay
instant, and importing numba alone takes longer than the rest of the CLI start-up.
"""

from __future__ import annotations

import platform
from importlib import metadata

from . import __version__

DEPENDENCIES = ("numpy", "numba", "safetensors", "huggingface_hub")  # the last one is optional


def describe_versions() -> str:
    """One line each: npmerge, Python (implementation, OS, machine), then each dependency."""
    lines = [f"npmerge {__version__}",
             f"python {platform.python_version()} ({platform.python_implementation()}, "
             f"{platform.system()} {platform.machine()})"]
    for dist in DEPENDENCIES:
        try:
            lines.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{dist} not installed")
    return "\n".join(lines)
