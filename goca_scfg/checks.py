"""Argument checks shared by the configs, the pipelines' `__call__` and the CLI: one clear error naming the input.

Standard library only, so that the CLI can check its arguments before importing torch.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


def check_bool(name: str, value: object) -> bool:
    """`value` must be a real bool (not 0/1)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(name: str, value: object, minimum: int | None = None) -> int:
    """`value` must be a whole number given as an int (not a float such as 2.0, not a bool), at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_float(
    name: str,
    value: object,
    *,
    above: float | None = None,
    below: float | None = None,
    at_least: float | None = None,
) -> float:
    """`value` must be a finite real number (int or float, not a bool), > `above`, < `below`, >= `at_least`."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if above is not None and not value > above:
        raise ValueError(f"{name} must be > {above}, got {value!r}")
    if below is not None and not value < below:
        raise ValueError(f"{name} must be < {below}, got {value!r}")
    if at_least is not None and not value >= at_least:
        raise ValueError(f"{name} must be >= {at_least}, got {value!r}")
    return float(value)


def check_name(name: str, value: object) -> str:
    """`value` must be a non-empty str."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {value!r}")
    if not value.strip():
        raise ValueError(f"{name} must not be empty")
    return value


def check_names(name: str, value: object) -> tuple[str, ...]:
    """`value` must be a tuple (or list) of non-empty str; a bare str is refused rather than split into letters."""
    if isinstance(value, str) or not isinstance(value, tuple | list):
        raise TypeError(f"{name} must be a tuple of str, got {value!r}")
    for i, item in enumerate(value):
        check_name(f"{name}[{i}]", item)
    return tuple(value)


def check_caption(caption: object) -> list[str]:
    """`caption` (the text that names a segmentor's regions) must be a str or a list/tuple of str; as a list."""
    texts = [caption] if isinstance(caption, str) else caption
    if not isinstance(texts, list | tuple) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"caption must be a str or a list of str, got {caption!r}")
    return list(texts)


def check_call_inputs(
    num_inference_steps: object,
    guidance_scale: object,
    height: object,
    width: object,
    custom_schedule: bool = False,
) -> None:
    """Refuse, before any work, the pipeline-call inputs diffusers would turn into noise, NaNs or a hang.

    steps: an int >= 1, or None when `custom_schedule` (explicit `timesteps`/`sigmas` set the count, as in diffusers);
    guidance_scale: a finite number; height/width: None (the model's native size) or an int > 0.
    Raises ValueError naming the argument.
    """
    try:
        if num_inference_steps is not None or not custom_schedule:
            check_int("num_inference_steps", num_inference_steps, minimum=1)
        check_float("guidance_scale", guidance_scale)
        for name, value in (("height", height), ("width", width)):
            if value is not None:
                check_int(name, value, minimum=1)
    except TypeError as err:
        raise ValueError(str(err)) from None
