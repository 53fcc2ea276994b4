"""What the `ssl-vit` commands share: one-line parse errors, numbers checked against their range, output paths
checked before any work."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """A parse error is one line, like every other user error of `ssl-vit` (the usage is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def number(kind: type[int] | type[float], low: float, high: float = math.inf, *,
           above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite `kind` ≥ `low` (> with `above`) and ≤ `high`; NaN, inf or out of range is
    refused at parse time, before a backbone loads (a NaN lr trained and reported a head)."""
    what = "an integer" if kind is int else "a finite number"
    rule = f"in {'(' if above else '['}{low}, {high}]" if high < math.inf else f"{'>' if above else '≥'} {low}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        # chained comparisons, not math.isfinite: that raises OverflowError on a 400-digit int
        if not (-math.inf < value < math.inf and (value > low if above else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"must be {what} {rule}, got {text}")
        return value

    return parse


POSITIVE = number(float, 0, above=True)  # lrs, temperatures, timeouts, sizes
NON_NEGATIVE = number(float, 0)  # weight decays
SHARE = number(float, 0, 1, above=True)  # crop ratios, attention mass kept
COUNT = number(int, 1)  # batches, epochs, steps, k, images
COUNT_OR_ZERO = number(int, 0)  # loader workers (0: in-process), warmup epochs
SEED = number(int, 0, 2**63 - 1)  # every seeding call takes it (2**64 was "Overflow when unpacking long long")


def add_recipe_args(p: argparse.ArgumentParser, default: str, example: str = "optim.base_lr=1e-4") -> None:
    """The recipe and its `--set` overrides, as pretrain, benchmark, config and finetune take them."""
    p.add_argument("recipe", nargs="?", help=f"recipe file or name in recipes/ (default: {default})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override any config key, e.g. --set {example} (repeatable)")


def check_output(path: str | Path | None, flag: str, *, file: str | None = None) -> None:
    """Refuse an output path that could not be written, before any work: failing there at the end would lose
    the features, scores or timings computed by then. A folder, or a file like `file`; missing parents are made
    later."""
    if path is None:
        return
    target = Path(path)
    if not file and target.exists() and not target.is_dir():
        raise ValueError(f"{flag} {target} is a file, not a folder")
    if file and target.is_dir():
        raise ValueError(f"{flag} {target} is a folder; give a file path, e.g. {target / file}")
    existing = target if target.is_dir() else target.parent
    while not existing.exists() and existing != existing.parent:  # the nearest part of it that exists
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {target}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or (target.is_file() and not os.access(target, os.W_OK)):
        raise ValueError(f"{flag} {target}: {target if target.is_file() else existing} is not writable")
