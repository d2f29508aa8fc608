"""argparse types shared by the `apex-hf` commands (here, not in `cli.py`, because `cli.py` imports the commands'
argument builders, e.g. `demo.py`'s). The standard library only: `--help` stays fast."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(low: int) -> Callable[[str], int]:
    """An argparse `type`: an integer >= `low`, so that `--seq-len -5` is refused while parsing, naming the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is invalid: must be >= {low}")
        return value

    return parse
