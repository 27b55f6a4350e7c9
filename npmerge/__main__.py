"""`python -m npmerge`: the same command line as the `npmerge` script."""

from .cli import entry

if __name__ == "__main__":
    entry()
