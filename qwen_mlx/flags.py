"""Numbers from the command line, checked where argparse reads them: one helper builds every flag's type, so a bad
value ends as argparse's one line naming the flag (exit status 2) before anything is loaded."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def number(kind: type = int, *, low: float | None = None, high: float | None = None,
           above: float | None = None) -> Callable[[str], int | float]:
    """An argparse `type`: `kind` (int or float) parsed from the text, finite, and within low <= x <= high and
    x > above (each bound optional)."""
    def parse(text: str):
        value = kind(text)  # a ValueError here is argparse's own "invalid int value: 'x'"
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be greater than {above:g}, got {text}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages
    return parse
