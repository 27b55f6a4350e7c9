"""Merge methods, registered as data (see registry.py)."""
