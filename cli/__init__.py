"""``craft``: argparse and printing only; every subcommand lives in its own module of this package."""

from .app import main

__all__ = ["main"]
