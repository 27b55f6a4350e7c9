"""npmerge: exact, bounded-memory merging of fine-tuned safetensors checkpoints on CPU.

The library API is `merge(recipe, out, ...)`; the CLI (`npmerge`) is a thin layer
over it. Importing npmerge never imports numba: kernels load on first use.
"""

__version__ = "0.1.0"


def merge(recipe, out, *, max_memory=None, threads=None, force=False, resume=False, progress=None):
    """Run `recipe` and write the merged model to directory `out`; return the report.

    `resume=True` continues an interrupted merge of the same recipe into the same `out`."""
    from .api import run_merge

    return run_merge(recipe, out, max_memory=max_memory, threads=threads, force=force, resume=resume,
                     progress=progress)
