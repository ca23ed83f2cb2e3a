"""The `goca-scfg` command: generate an image with spatially adaptive guidance, optionally with its maps.

Every argument is checked before the model loads; a bad one ends the command with one line `error: …` on stderr and
exit status 2 (`--debug` shows the traceback instead). torch and diffusers are imported only to generate, so
`--help` and usage errors answer at once. Nothing is written unless the whole command succeeds; an output that is a
symbolic link is written through (the file it points at is replaced, the link stays). A run that takes longer than
a few seconds prints `step i/N …` progress lines on stderr. The bounds and every refused input: docs/bad_input.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .checks import MAX_GUIDANCE_SCALE, MAX_SEED, MAX_STEPS, check_float, check_int
from .families import FAMILIES, Family, family_of
from .loading import SCFG_PIPELINES, TINY_MODELS
from .vocab import DTYPE_NAMES, METHOD_ALIASES, METHOD_NAMES, SCHEDULER_NAMES, get_method, torch_dtype

MAX_SIZE = 4096  # pixels per side; larger requests are refused rather than left to exhaust memory
SIZE_MULTIPLE = 8  # the VAE's down-sampling factor in SD v1.x/2.x
USAGE_ERROR = 2  # bad input
RUN_ERROR = 1  # a failure while generating
PROGRESS_EVERY_S = 10.0  # a progress line at most this often; runs shorter than this print none


class CLIError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


def say_error(message: str) -> None:
    """Print `error: message` as one line, whatever the terminal's encoding can show."""
    line = " ".join(f"error: {message}".split())
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    print(line.encode(encoding, "backslashreplace").decode(encoding), file=sys.stderr)


class OneLineParser(argparse.ArgumentParser):
    """argparse, with usage errors as one line `error: …` (exit 2) instead of the usage block."""

    def error(self, message: str):
        say_error(f"{message} (see `{self.prog} --help`)")
        raise SystemExit(USAGE_ERROR)


def _arg_type(check, *args, **kwargs):
    """An argparse `type=` from a checks.py function: parse the text, then range-check it."""

    kind = int if check is check_int else float

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: not a {parse.__name__}") from None
        try:
            return check("value", value, *args, **kwargs)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {str(err).removeprefix('value ')}") from None

    parse.__name__ = "whole number" if check is check_int else "number"
    return parse


def _size(text: str) -> int:
    """A side length in pixels: a positive multiple of 8, at most MAX_SIZE."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: not a whole number") from None
    if not 0 < value <= MAX_SIZE or value % SIZE_MULTIPLE:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: must be a multiple of {SIZE_MULTIPLE} between {SIZE_MULTIPLE} and {MAX_SIZE}"
        )
    return value


def _titles() -> str:
    """The registered model families, "A, B or C"."""
    titles = [f.title for f in FAMILIES]
    return ", ".join(titles[:-1]) + " or " + titles[-1] if len(titles) > 1 else titles[0]


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="goca-scfg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    gen = sub.add_parser("generate", help="generate one image", description="Generate one image.")
    gen.add_argument(
        "--model",
        required=True,
        help=f"hub id or local folder of a diffusers {_titles()} model (its model_index.json picks the pipeline), "
        f"or an offline tiny model: {', '.join(TINY_MODELS)}",
    )
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    methods = [*METHOD_NAMES, *METHOD_ALIASES]
    gen.add_argument(
        "--segmentor",
        choices=methods,
        default="goca",
        metavar="METHOD",
        help=f"guidance method: {', '.join(methods)} ('none' = 'cfg', plain CFG; default goca)",
    )
    w_max = f"{MAX_GUIDANCE_SCALE:g}"
    gen.add_argument(
        "--guidance-scale",
        type=_arg_type(check_float, at_least=-MAX_GUIDANCE_SCALE, at_most=MAX_GUIDANCE_SCALE),
        default=7.5,
        help=f"between -{w_max} and {w_max}; <= 1 turns CFG off (default 7.5)",
    )
    gen.add_argument(
        "--steps",
        type=_arg_type(check_int, minimum=1, maximum=MAX_STEPS),
        default=50,
        help=f"denoising steps, 1 to {MAX_STEPS} (the schedulers' training timesteps; default 50)",
    )
    gen.add_argument(
        "--seed",
        type=_arg_type(check_int, minimum=0, maximum=MAX_SEED),
        default=42,
        help="generator seed, 0 to 2**64-1 (default 42)",
    )
    size_help = f"pixels, a multiple of {SIZE_MULTIPLE} up to {MAX_SIZE} (default: the model's native size)"
    gen.add_argument("--height", type=_size, default=None, help=size_help)
    gen.add_argument("--width", type=_size, default=None, help=size_help)
    gen.add_argument("--scheduler", choices=SCHEDULER_NAMES, default="default")
    gen.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: fp16 on CUDA, else fp32")
    gen.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    gen.add_argument(
        "--out",
        required=True,
        help="output image; the extension picks the format (.png, .jpg, …); a symbolic link is written through",
    )
    gen.add_argument("--maps", default=None, help="also write the last step's regions, foreground and rate (image)")
    gen.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


# ------------------------------------------------------------------------------------------------ input checks


@dataclass(frozen=True)
class OutputFile:
    """A checked output path and the PIL format its extension selects."""

    path: Path
    format: str


def _pil_format(path: Path) -> str | None:
    from PIL import Image

    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    return fmt if fmt in Image.SAVE else None


def _write_target(flag: str, value: str, path: Path) -> Path:
    """The file to write for `path`: itself, or the file a symbolic link (chain) points at, so that the link is
    written through and never replaced by a file; a link that loops is refused."""
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # realpath stops where a chain of links loops
        raise CLIError(f"{flag} {value} is a symbolic link that loops; give a file name")
    return target


def check_output(flag: str, value: str) -> OutputFile:
    """The file named by `flag` can be written: its folder exists and is writable, PIL knows its extension (the one
    typed); a symbolic link names the file it points at."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise CLIError(f"{flag} {value} is a folder; give a file name such as {path / 'image.png'}")
    target = _write_target(flag, value, path)
    folder = target.parent.resolve()
    if folder.exists() and not folder.is_dir():
        raise CLIError(f"{flag} {value}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise CLIError(f"{flag} {value}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise CLIError(f"{flag} {value}: no permission to write there")
    fmt = _pil_format(path)
    if fmt is None:
        shown = path.suffix or "(no extension)"
        raise CLIError(f"{flag} {value}: cannot write {shown} images; use an image extension such as .png or .jpg")
    return OutputFile(folder / target.name, fmt)


def _check_text(flag: str, text: str | None) -> None:
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CLIError(f"{flag} is not valid UTF-8 text (check the terminal's or script's encoding)") from None


def _looks_local(model: str) -> bool:
    """A filesystem path rather than a hub id ("owner/name" or "name")."""
    return model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1 or os.path.exists(model)


def check_model(model: str) -> Family | None:
    """A local model folder must exist and hold a `model_index.json` naming a pipeline with an SCFG pipeline.
    Returns the model's family (None for a hub id: checked when loading)."""
    if model in TINY_MODELS:
        return next(f for f in FAMILIES if model in f.tiny_models)
    if not _looks_local(model):
        return None
    path = Path(model).expanduser()
    if not path.exists():
        raise CLIError(f"--model {model}: no such folder")
    index = path / "model_index.json"
    if not index.is_file():
        raise CLIError(f"--model {model}: not a diffusers pipeline folder (no model_index.json)")
    try:
        name = json.loads(index.read_text(encoding="utf-8"))["_class_name"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        name = None
    if not isinstance(name, str):
        raise CLIError(f"--model {model}: its model_index.json is not a diffusers index (no readable _class_name)")
    if name not in SCFG_PIPELINES:
        raise CLIError(f"--model {model} is a {name}; SCFG pipelines exist for {', '.join(sorted(SCFG_PIPELINES))}")
    return family_of(name)


def check_method(family: Family | None, segmentor: str) -> None:
    """S-CFG's segmentation reads UNet blocks: a transformer model (PixArt-Sigma, …) gets GoCA or plain CFG."""
    method = get_method(segmentor)
    if family is not None and family.denoiser == "transformer" and method.segmentor == "scfg":
        raise CLIError(
            f"--segmentor {segmentor}: S-CFG's segmentation is defined for UNet models only, and {family.title} is a "
            "transformer; use goca, goca-vanilla (the authors' baseline there) or cfg"
        )


def check_args(args: argparse.Namespace) -> tuple[OutputFile, OutputFile | None]:
    """Every check that needs neither torch nor the model. Returns the output files."""
    _check_text("--prompt", args.prompt)
    _check_text("--negative-prompt", args.negative_prompt)
    check_method(check_model(args.model), args.segmentor)
    out = check_output("--out", args.out)
    maps = check_output("--maps", args.maps) if args.maps is not None else None
    if maps is not None:
        if maps.path == out.path or (maps.path.exists() and out.path.exists() and maps.path.samefile(out.path)):
            raise CLIError(f"--out and --maps name the same file ({out.path}); the maps would replace the image")
        if get_method(args.segmentor).segmentor is None or args.guidance_scale <= 1:
            raise CLIError("--maps needs segmentation: a segmentor other than cfg/none and --guidance-scale > 1")
    return out, maps


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {device}: not a torch device name (e.g. cpu, cuda, cuda:1)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available on this machine")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {device}: MPS is not available on this machine")
    if kind == "meta":
        raise CLIError(f"--device {device}: the meta device holds no weights; use cpu or cuda")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _load(model: str, dtype, device: str):
    """Load the pipeline; a model that cannot be found or read becomes one CLIError line."""
    from diffusers.utils import logging as diffusers_logging

    from .loading import TINY_MODELS, load_pipeline

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # hub look-up chatter would break the one-line error
    try:
        return load_pipeline(model, torch_dtype=dtype, device=device)
    except ValueError as err:  # a diffusers pipeline of a kind with no SCFG pipeline
        raise CLIError(f"--model {model}: {err}") from err
    except OSError as err:
        if _offline() and not _looks_local(model) and model not in TINY_MODELS:  # tiny models are built, not read
            raise CLIError(
                f"--model {model}: not in the local Hugging Face cache, and downloads are off (HF_HUB_OFFLINE=1)"
            ) from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIError(f"--model {model}: cannot be loaded: {first}") from err
    finally:
        diffusers_logging.set_verbosity(verbosity)


# ------------------------------------------------------------------------------------------------ the command


def _write_atomically(target: OutputFile, image) -> None:
    """Save `image` next to the target under a temporary name, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=target.path.parent, prefix=f".{target.path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=target.format)
        os.chmod(tmp, _file_mode(target.path))  # mkstemp's 0600 would make the image private
        os.replace(tmp, target.path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _file_mode(path: Path) -> int:
    """The permission bits a replaced file keeps, or a new file's (0666 less the umask)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


class _Progress:
    """Step-end callback: `step i/N, s elapsed, about s left` on stderr once `every` seconds have passed since the
    start or the last line, and the last step when any line was printed; a short run prints nothing."""

    def __init__(self, every: float | None = None) -> None:
        self.every = PROGRESS_EVERY_S if every is None else every
        self.start = self.last = time.monotonic()
        self.printed = False

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        now = time.monotonic()
        done, total = step + 1, max(getattr(pipe, "_num_timesteps", 0) or 0, step + 1)
        if now - self.last >= self.every or (done == total and self.printed):
            elapsed = now - self.start
            left = elapsed / done * (total - done)
            print(f"step {done}/{total}, {elapsed:.0f} s, about {left:.0f} s left", file=sys.stderr, flush=True)
            self.last, self.printed = now, True
        return {}


# the pipeline's argument names in its own errors → the options that set them
_FLAGS = {
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance-scale",
    "height": "--height",
    "width": "--width",
    "segmentor": "--segmentor",
    "prompt": "--prompt",
    "negative_prompt": "--negative-prompt",
    "generator": "--seed",
}


def _name_options(message: str) -> str:
    """A pipeline error as the CLI reports it: prefixed with the options it is about ("--height/--width: …")."""
    flags = [flag for name, flag in _FLAGS.items() if re.search(rf"\b{name}\b", message) and flag not in message]
    return f"{'/'.join(dict.fromkeys(flags))}: {message}" if flags else message


def _maps_picture(image, step_maps):
    """The maps figure rendered to a PIL image (so that any PIL format can be written)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from .viz import plot_step_maps

    fig = plot_step_maps(image, step_maps)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def generate(args: argparse.Namespace) -> None:
    out, maps = check_args(args)
    import torch

    from .loading import native_size, swap_scheduler

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_device(device)
    dtype = torch_dtype(args.dtype or "auto", torch.device(device).type)
    pipe = _load(args.model, dtype, device)
    try:
        swap_scheduler(pipe, args.scheduler)
    except ValueError as err:  # e.g. a noise-prediction scheduler for a flow-matching model
        raise CLIError(f"--scheduler {args.scheduler}: {err}") from err
    pipe.set_progress_bar_config(disable=True)  # our own progress lines instead (tiny models have none)
    default_h, default_w = native_size(pipe)
    method = get_method(args.segmentor)
    kwargs = method.pipeline_kwargs()
    try:
        # each pipeline's own default negative prompt (None for SD, "" for PixArt) unless one is given; the family's
        # keyword for w (Flux: true_cfg_scale, with "" as negative prompt where none is given)
        guidance = family_of(pipe).guidance_kwargs(args.guidance_scale, 1, args.negative_prompt)
        result = pipe(
            args.prompt,
            **guidance,
            height=args.height or default_h,
            width=args.width or default_w,
            num_inference_steps=args.steps,
            generator=torch.Generator(device="cpu").manual_seed(args.seed),
            return_maps=maps is not None,
            callback_on_step_end=_Progress(),
            **kwargs,
        )
    except (ValueError, TypeError) as err:  # the pipeline's own input checks
        raise CLIError(_name_options(str(err))) from err
    image = result.images[0]
    picture = None
    if maps is not None:
        if not result.maps:
            raise CLIError("no maps: nothing was segmented (see the warnings above)")
        picture = _maps_picture(image, result.maps[-1])
    _write_atomically(out, image)
    print(f"wrote {out.path}")
    if picture is not None:
        _write_atomically(maps, picture)
        print(f"wrote {maps.path}")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            generate(args)
    except CLIError as err:
        if args.debug:
            raise
        say_error(str(err))
        raise SystemExit(USAGE_ERROR) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        if args.debug:
            raise
        say_error(f"{type(err).__name__}: {err} (run with --debug for the traceback)")
        raise SystemExit(RUN_ERROR) from None


if __name__ == "__main__":
    main()
