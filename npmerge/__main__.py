"""`python -m npmerge`: the same command line as the `npmerge` script."""

from .cli import run

if __name__ == "__main__":
    run()
