"""What every ``craft`` subcommand shares: the error type, the help format, argument types, output."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

__all__ = ["CliError", "HelpFormatter", "LazyChoices", "window", "save_images", "ProgressBar", "dataclass_default"]


class CliError(Exception):
    """A user-facing error: printed as ``craft: error: ...`` and exit code 2, no traceback."""


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its choices and its default (``default: off`` for switches).

    A help text that already says what its default means (``default: the recipe's``) keeps it.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.help == argparse.SUPPRESS:
            return text
        extras = []
        if action.choices is not None and "choices" not in text:
            extras.append("choices: " + ", ".join(str(c) for c in action.choices))
        if not action.required and "default" not in text and action.default is not argparse.SUPPRESS:
            if action.nargs == 0:  # store_true / store_false switches
                extras.append("default: " + ("on" if action.default else "off"))
            elif action.default is not None:
                extras.append("default: %(default)s")
        return f"{text} ({'; '.join(extras)})" if extras else text


class LazyChoices(Sequence):
    """Choices read on first use, so building the parser imports nothing heavy (``craft --help``).

    Give the argument a ``metavar``: argparse formats the metavar when the argument is added, and
    without one it would read the choices there.
    """

    def __init__(self, load: Callable[[], Sequence[str]]):
        self._load = load
        self._items: list[str] | None = None

    def _get(self) -> list[str]:
        if self._items is None:
            self._items = list(self._load())
        return self._items

    def __getitem__(self, index):
        return self._get()[index]

    def __len__(self) -> int:
        return len(self._get())

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __contains__(self, item: object) -> bool:
        return item in self._get()


def window(text: str) -> tuple[float, float]:
    """``START,END`` fractions of a time-gate window."""
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"window must be 'START,END' fractions, got {text!r}") from exc
    return a, b


def save_images(images, out: Path) -> list[Path]:
    """One PNG per image: ``out`` itself, or ``NAME-<i>.png`` when there are several."""
    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        Image.fromarray(image).save(path)
    return paths


class ProgressBar:
    """``[#####.....] step i/N`` on stderr, redrawn in place; :meth:`close` ends the line."""

    def __init__(self, width: int = 30):
        self.width = width
        self.drawn = False

    def __call__(self, step: int, total: int, *_ignored) -> None:
        filled = int(self.width * step / max(total, 1))
        print(f"\r[{'#' * filled}{'.' * (self.width - filled)}] step {step}/{total}", end="", file=sys.stderr, flush=True)
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            print(file=sys.stderr)
            self.drawn = False


def dataclass_default(cls, name: str):
    """The default of a configuration dataclass field: the CLI shows the library's own default."""
    return cls.__dataclass_fields__[name].default
