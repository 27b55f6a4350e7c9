"""Byte counts for humans: decimal units for disk sizes (as --shard-size is given and
disks are sold), binary units for memory (as --max-memory budgets are usually given)."""

from __future__ import annotations


def human_bytes(n: float, binary: bool = False) -> str:
    """e.g. "461.57 kB", "4.29 GB", "512 bytes"; binary: "4.00 GiB", "1.00 KiB"."""
    units = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if binary else (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))
    for unit, size in units:
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} bytes"
