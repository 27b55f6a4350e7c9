"""Byte counts for humans (decimal units, as disk sizes and --shard-size are given)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """e.g. "461.57 kB", "4.29 GB", "512 bytes"."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} bytes"
