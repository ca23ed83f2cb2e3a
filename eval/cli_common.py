"""What the evaluation CLIs share: one-line usage errors, option value checks and the device check.

A bad input ends a command with one line `error: …` on stderr and exit status 2, before any model loads or any file
is written. torch is imported only by `check_device`.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable

from goca_scfg.checks import MAX_SEED
from goca_scfg.cli import USAGE_ERROR, say_error  # one error line for every CLI
from goca_scfg.cli import OneLineParser as OneLineParser  # re-exported for the eval CLIs

logger = logging.getLogger(__name__)

SEED_MAX = MAX_SEED  # torch.Generator.manual_seed takes unsigned 64-bit seeds, as `goca-scfg generate --seed`


def report_error(err: BaseException) -> int:
    """The CLIs' handler of bad input (OSError, ValueError): one line, the traceback only in the debug log."""
    logger.debug("error details", exc_info=True)
    say_error(err)
    return USAGE_ERROR


def whole_number(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse `type=`: a whole number in [minimum, maximum]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: not a whole number") from None
        _check_range(text, value, minimum, maximum)
        return value

    return parse


def positive_seconds(text: str) -> float:
    """An argparse `type=`: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be a finite number of seconds > 0")
    return value


def _check_range(text: str, value: int, minimum: int | None, maximum: int | None) -> None:
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = "" if minimum is None else f">= {minimum}"
        high = "" if maximum is None else f"<= {maximum}"
        bounds = " and ".join(part for part in (low, high) if part)
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be {bounds}")


def seed_list(text: str) -> tuple[int, ...]:
    """An argparse `type=` for `--seeds`: comma-separated whole numbers in [0, 2**64 - 1] (torch's seed range)."""
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty item; give a comma-separated list like 0,1,2")
    seeds = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
        if not 0 <= value <= SEED_MAX:
            raise argparse.ArgumentTypeError(f"seed {part} is outside 0 … 2**64 - 1 (torch's seed range)")
        seeds.append(value)
    return tuple(seeds)


def check_device(option: str, device: str) -> str:
    """`device` names a torch device that exists here; otherwise ValueError naming `option`."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ValueError(f"{option} {device}: not a torch device name (e.g. cpu, cuda, cuda:1)") from None
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {device}: CUDA is not available on this machine (use --device cpu)")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif kind not in ("cpu", "cuda") and not _backend_available(torch, kind):
        raise ValueError(f"{option} {device}: the {kind} backend is not available on this machine")
    return device


def _backend_available(torch, kind: str) -> bool:
    backend = getattr(torch, kind, None) or getattr(torch.backends, kind, None)
    probe = getattr(backend, "is_available", None)
    return bool(probe()) if callable(probe) else False
