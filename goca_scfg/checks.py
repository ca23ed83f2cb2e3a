"""Argument checks shared by the configs, the pipelines' `__call__` and the CLI: one clear error naming the input.

Importing it imports only the standard library, so that the CLI can check its arguments before importing torch;
the tensor checks (latents, generators, masks, step-end callback outputs) import torch when called. What each check
refuses, and why, is listed in docs/bad_input.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

# |guidance_scale| above this is refused: w·Δ of ε-predictions (|Δ| up to ~10) must stay inside fp16's range (65504),
# and 1e308 (fp32: inf) turned every image black. Published scales are 1–20; 1000 leaves room for experiments.
MAX_GUIDANCE_SCALE = 1000.0
# torch.Generator.manual_seed takes a 64-bit seed; 2**64 overflows ("Overflow when unpacking long long").
MAX_SEED = 2**64 - 1
# The most denoising steps before a model is loaded: the num_train_timesteps of every supported family's scheduler
# (SD, SDXL, PixArt-Sigma: 1000). More steps than training timesteps repeat timesteps (PNDM: all 0) or are refused
# deep inside the scheduler (DDIM); a loaded pipeline checks against its own scheduler's count.
MAX_STEPS = 1000
# diffusers' output types; any other string (a typo such as "PIL") is turned into "np" with only a warning.
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_bool(name: str, value: object) -> bool:
    """`value` must be a real bool (not 0/1)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` must be a whole number given as an int (not a float such as 2.0, not a bool), in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}")
    return int(value)


def check_float(
    name: str,
    value: object,
    *,
    above: float | None = None,
    below: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
) -> float:
    """`value` must be a finite real number (int or float, not a bool), > `above`, < `below`, >= `at_least`,
    <= `at_most`."""
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
    if at_most is not None and not value <= at_most:
        raise ValueError(f"{name} must be <= {at_most}, got {value!r}")
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
    *,
    max_steps: int | None = None,
) -> None:
    """Refuse, before any work, the pipeline-call inputs diffusers would turn into noise, NaNs or a hang.

    steps: an int >= 1 (at most `max_steps`, the scheduler's training timesteps), or None when `custom_schedule`
    (explicit `timesteps`/`sigmas` set the count, as in diffusers); guidance_scale: a finite number of magnitude at
    most MAX_GUIDANCE_SCALE; height/width: None (the model's native size) or an int > 0. Raises ValueError naming
    the argument.
    """
    try:
        if num_inference_steps is not None or not custom_schedule:
            check_int("num_inference_steps", num_inference_steps, minimum=1, maximum=max_steps)
        check_float("guidance_scale", guidance_scale)
        if abs(guidance_scale) > MAX_GUIDANCE_SCALE:
            raise ValueError(
                f"guidance_scale must be between -{MAX_GUIDANCE_SCALE:g} and {MAX_GUIDANCE_SCALE:g} (w·Δ must stay "
                f"inside the denoiser's number range; published scales are 1–20), got {guidance_scale!r}"
            )
        for name, value in (("height", height), ("width", width)):
            if value is not None:
                check_int(name, value, minimum=1)
    except TypeError as err:
        raise ValueError(str(err)) from None


def check_type(name: str, value: object, expected: type, hint: str = "") -> None:
    """`value` must be None or an instance of `expected` (a config object, not its dict or its name)."""
    if value is not None and not isinstance(value, expected):
        if isinstance(value, type):
            shown = f"the class {value.__name__}"
        else:
            shown = repr(value) if len(repr(value)) <= 60 else f"{type(value).__name__}(…)"
            shown = shown if shown.startswith(type(value).__name__) else f"{type(value).__name__} {shown}"
        article = "an" if expected.__name__[:1] in "AEFHILMNORSX" else "a"  # "an SCFGConfig", "a GoCAConfig"
        raise TypeError(f"{name} must be {article} {expected.__name__} or None, got {shown}{hint}")


def check_prompt(name: str, prompt: object) -> None:
    """A prompt must be None, a str or a non-empty list of str (diffusers takes no tuples)."""
    if prompt is None or isinstance(prompt, str):
        return
    if not isinstance(prompt, list):
        raise TypeError(f"{name} must be a str or a list of str, got {type(prompt).__name__} {prompt!r}")
    if not prompt:
        raise ValueError(f"{name} is an empty list: give at least one prompt")
    for i, text in enumerate(prompt):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(text).__name__} {text!r}")


def check_output_type(output_type: object) -> None:
    """`output_type` must be one of diffusers' OUTPUT_TYPES (diffusers turns a typo into "np" with a warning)."""
    if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def check_callable(name: str, value: object) -> None:
    """`value` must be None or callable (a step-end callback, not its name or result)."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a function (pipe, step, timestep, callback_kwargs) -> dict, got {value!r}")


def check_segmentor_arg(value: object, names: Sequence[str], segmentor_type: type, methods: Sequence[str]) -> None:
    """`segmentor` must be None, one of `names` or a `segmentor_type` instance. A near miss says what was meant:
    another case ("GOCA"), a CLI method name ("goca-vanilla", "cfg": pass its settings), "none" (None), a class."""
    if value is None or isinstance(value, segmentor_type):
        return
    if isinstance(value, type) and issubclass(value, segmentor_type):
        raise TypeError(
            f"segmentor must be a Segmentor instance, got the class {value.__name__}; pass {value.__name__}()"
        )
    if not isinstance(value, str):
        raise TypeError(f"segmentor must be one of {tuple(names)}, a Segmentor instance or None, got {value!r}")
    if value in names:
        return
    lower = value.strip().lower()
    if lower in names:
        hint = f"; names are lower case: segmentor={lower!r}"
    elif lower in ("none", "cfg", ""):
        hint = "; for plain CFG pass segmentor=None"
    elif lower in methods:
        hint = (
            f"; {lower!r} is a method name of the CLI and the sweep: pass its settings, "
            f"**goca_scfg.vocab.get_method({lower!r}).pipeline_kwargs()"
        )
    else:
        hint = ""
    raise ValueError(
        f"unknown segmentor {value!r}; expected one of {tuple(names)}, a Segmentor instance or None{hint}"
    )


def check_generator(generator: object, batch: int) -> None:
    """`generator` must be None, a torch.Generator or a list of exactly `batch` of them (one per image).
    Imports torch."""
    import torch

    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, list):
        for i, g in enumerate(generator):
            if not isinstance(g, torch.Generator):
                raise TypeError(f"generator[{i}] must be a torch.Generator, got {type(g).__name__} {g!r}")
        if len(generator) != batch:
            raise ValueError(
                f"generator is a list of {len(generator)} generators but the call makes {batch} image(s): one each"
            )
        return
    raise TypeError(
        f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(42)), a list of them (one per "
        f"image) or None, got {type(generator).__name__} {generator!r}"
    )


def check_latents(latents: object, shape: tuple[int, ...], dtype: Any = None) -> None:
    """`latents` (the initial noise) must be a finite floating-point tensor of exactly `shape` (batch, channels and
    latent size of the call) and, unless `dtype` is None, of that dtype (the denoiser's, where the pipeline does not
    convert it; autocast excepted). Imports torch."""
    import torch

    if latents is None:
        return
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor of shape {tuple(shape)}, got {type(latents).__name__}")
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(
            f"latents must have shape {tuple(shape)} (images, channels, height/8, width/8 of this call), "
            f"got {tuple(latents.shape)}"
        )
    if not latents.dtype.is_floating_point:
        raise ValueError(f"latents must be a floating-point tensor, got {latents.dtype}")
    if dtype is not None and latents.dtype != dtype and not torch.is_autocast_enabled(latents.device.type):
        raise ValueError(
            f"latents have dtype {latents.dtype} but the denoiser runs in {dtype}: pass latents.to({dtype})"
        )
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("latents hold NaN or inf values")


def check_step_end_outputs(step: int, outputs: object, latents: Any) -> None:
    """What a step-end callback returned: a dict; its "latents", if any, a tensor of the current latents' shape and
    dtype. Imports torch."""
    import torch

    if not isinstance(outputs, dict):
        raise TypeError(
            f"callback_on_step_end must return a dict (e.g. its callback_kwargs), got {type(outputs).__name__} at "
            f"step {step}"
        )
    new = outputs.get("latents", latents)
    if new is latents:
        return
    if not isinstance(new, torch.Tensor):
        raise TypeError(f"callback_on_step_end returned latents of type {type(new).__name__} at step {step}")
    if new.shape != latents.shape or new.dtype != latents.dtype:
        raise ValueError(
            f"callback_on_step_end returned latents of shape {tuple(new.shape)} ({new.dtype}) at step {step}; the "
            f"loop needs {tuple(latents.shape)} ({latents.dtype})"
        )


def check_masks(segmentor: str, step: int, result: object, batch: int, latent_hw: tuple[int, int]) -> tuple[Any, Any]:
    """A segmentor's `segment()` result: (masks (B, T, h, w), foreground (B, 1, h, w)) at latent size. Returned as
    the pair. Imports torch."""
    import torch

    h, w = latent_hw
    expected = f"(masks ({batch}, T, {h}, {w}), foreground ({batch}, 1, {h}, {w}))"
    if not isinstance(result, tuple | list) or len(result) != 2:
        raise TypeError(f"segmentor {segmentor} returned {type(result).__name__} at step {step}; expected {expected}")
    masks, fg = result
    if not isinstance(masks, torch.Tensor) or not isinstance(fg, torch.Tensor):
        raise TypeError(f"segmentor {segmentor} returned non-tensors at step {step}; expected {expected}")
    if masks.ndim != 4 or masks.shape[0] != batch or masks.shape[1] < 1 or tuple(masks.shape[2:]) != (h, w):
        raise ValueError(
            f"segmentor {segmentor} returned masks of shape {tuple(masks.shape)} at step {step}; expected {expected}"
        )
    if tuple(fg.shape) != (batch, 1, h, w):
        raise ValueError(
            f"segmentor {segmentor} returned a foreground of shape {tuple(fg.shape)} at step {step}; expected "
            f"{expected}"
        )
    return masks, fg
