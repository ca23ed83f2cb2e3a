"""The `goca-scfg` command: generate an image with spatially adaptive guidance, optionally with its maps."""

from __future__ import annotations

import argparse
import sys

import torch

from .config import GoCAConfig, SCFGConfig

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="goca-scfg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate one image")
    gen.add_argument(
        "--model",
        required=True,
        help="hub id or local path of an SD 1.x/2.x or PixArt-Sigma model, or 'tiny-random' / 'tiny-random-pixart'",
    )
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--segmentor", choices=["goca", "goca-vanilla", "scfg", "none"], default="goca")
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--scheduler", choices=["default", "pndm", "ddim", "dpm++"], default="default")
    gen.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: fp16 on CUDA, else fp32")
    gen.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    gen.add_argument("--out", required=True, help="output image (PNG)")
    gen.add_argument("--maps", default=None, help="also write the last step's regions, foreground and rate (PNG)")
    return parser


def generate(args: argparse.Namespace) -> None:
    from .loading import load_pipeline, native_size, swap_scheduler
    from .viz import save_step_maps

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    pipe = load_pipeline(args.model, torch_dtype=dtype, device=device)
    swap_scheduler(pipe, args.scheduler)
    default_h, default_w = native_size(pipe)
    height, width = args.height or default_h, args.width or default_w
    segmentor = {"none": None, "goca-vanilla": "goca"}.get(args.segmentor, args.segmentor)
    goca_config = GoCAConfig.vanilla() if args.segmentor == "goca-vanilla" else GoCAConfig()
    # each pipeline's own default negative prompt (None for SD, "" for PixArt) unless one is given
    negative = {} if args.negative_prompt is None else {"negative_prompt": args.negative_prompt}
    out = pipe(
        args.prompt,
        **negative,
        height=height,
        width=width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
        segmentor=segmentor,
        scfg_config=SCFGConfig(),
        goca_config=goca_config,
        return_maps=args.maps is not None,
    )
    image = out.images[0]
    image.save(args.out)
    print(f"wrote {args.out}")
    if args.maps is not None:
        if not out.maps:
            print("no maps: segmentation is off (segmentor none or guidance scale <= 1)", file=sys.stderr)
            raise SystemExit(2)
        save_step_maps(args.maps, image, out.maps[-1])
        print(f"wrote {args.maps}")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "generate":
        generate(args)


if __name__ == "__main__":
    main()
