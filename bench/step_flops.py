"""FLOPs of one denoising step of plain CFG, S-CFG and GoCA, counted, not timed (no GPU needed).

One step = everything from the start of the step's first denoiser call to the scheduler step: the denoiser call on
the 2B (uncond + cond) batch (with the attention capture and its in-forward reducers), the segmentation, the rate and
the combine. Flux's true CFG makes two denoiser calls per step (cond, recorded; then uncond, on B rows each): both
count as "denoiser" (`denoiser_calls` says how many), and the segmentation, rate and combine after them as "after
it". It is counted through an ordinary pipeline call (`num_inference_steps=1`, latent output), so the same script
counts any tree of goca_scfg that has `StableDiffusionSCFGPipeline` (e.g. an older commit, for a before/after
comparison: run it with PYTHONPATH pointing at that tree).

Counting rule:
  - dense ops (matmul, conv, linear, bmm, einsum, ...) by `torch.utils.flop_counter.FlopCounterMode`;
  - every `F.scaled_dot_product_attention` call as 2·L_q·L_k·(d_qk + d_v) per head and batch row, whatever kernel
    runs it, with d_qk/d_v the (padded) head sizes actually passed. FlopCounterMode alone does not count this
    consistently on the CPU: the fused `_scaled_dot_product_flash_attention_for_cpu` counts as 0, while calls that
    fall back to the math path (unequal q/v head sizes) count as their two bmm's (= this rule). Each call is
    therefore counted by the rule and run with FlopCounterMode paused.

By default (`--mode shapes`) the denoiser's weights live on the meta device and, inside the counted step, every
counted op and every op touching a meta tensor is run for its output's shape only (zeros of the right shape and
strides on the CPU): no arithmetic where the FLOPs are, while everything that reads values (token masks, the
blank-uncond check, `int(t)`) still runs on real CPU tensors. The text encoders and the VAE are real (random) CPU
modules; the scheduler is DDIM, or the model's own flow-matching Euler (SD3, Flux: their pipelines pass sigmas and
shifts), as no scheduler adds counted FLOPs. The maps are zeros then, so this relies on no FLOP count depending on
attention values (it depends on shapes and token masks only); `--mode real` computes everything on the CPU (slow at
real sizes) and the tests check on the tiny models that both modes count the same.
The uncounted element-wise work still runs: on 2 CPU cores a row takes 10 s (512², CFG) to 6 min (1024², GoCA);
at 1024² GoCA's row takes 7 min on SD3.5-medium and 13 min on FLUX.1-dev.

Memory: each row also gives `record_bytes`, what the attention record holds when the segmentation reads it (after
the step's denoiser calls, before the segmentation frees it; `AttentionRecord.nbytes()`), in the dtypes the built
model records: the real-size builders of SD3 and Flux build in bf16 (also on meta: the shapes-only zeros keep each
op's dtype), the others in fp32; `record_fields` splits it by kind (q, k, o, reduced, k_rest).
`weights_16bit_bytes` is the denoiser's parameters at 2 bytes each, and `record_of_weights` the record's share of it
(a budget such as "the record ≤ 10 % of the fp16 weights" reads there).

`--arch` is a registered model family (goca_scfg/families/: its builders, denoiser and default sizes); on a tree
older than the registry, sd15 and sdxl by their old names.

  python bench/step_flops.py --arch sd15 --sizes 512,768,1024
  python bench/step_flops.py --arch sdxl --sizes 1024
  python bench/step_flops.py --arch pixart-sigma --sizes 512,1024
  python bench/step_flops.py --arch sd3            # SD3.5-medium, 1024², bf16 (meta transformer)
  python bench/step_flops.py --arch flux           # FLUX.1-dev, 1024², bf16, true CFG 4.0 (two calls per step)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode, flop_registry

PROMPT = "a photograph of an astronaut riding a horse on the beach"
METHODS = ("cfg", "scfg", "goca")


def sdpa_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """2·L_q·L_k·(d_qk + d_v) per head and batch row of one scaled-dot-product-attention call."""
    rows = math.prod(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))
    return 2 * rows * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _is_meta(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_meta


class ShapesOnly(TorchDispatchMode):
    """Counted ops (FlopCounterMode's registry) and ops touching a meta tensor return CPU zeros of the shape and
    strides the op would give, found on the meta device: no arithmetic where the FLOPs are."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [*args, *kwargs.values()]
        if func._overloadpacket not in flop_registry and not any(map(_is_meta, flat)):
            return func(*args, **kwargs)
        device = next((x.device for x in flat if isinstance(x, torch.Tensor) and not x.is_meta), torch.device("cpu"))
        meta = tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x, (args, kwargs))
        out = func(*meta[0], **meta[1])
        return tree_map(
            lambda m: (
                torch.empty_strided(m.shape, m.stride(), dtype=m.dtype, device=device).zero_() if _is_meta(m) else m
            ),
            out,
        )


class StepCounter(TorchFunctionMode):
    """Dense FLOPs by FlopCounterMode and SDPA FLOPs by `sdpa_flops`, split at the end of the denoiser call.
    shapes_only: no arithmetic in the counted ops (`ShapesOnly`); SDPA calls return zeros of their output shape."""

    def __init__(self, shapes_only: bool = False) -> None:
        super().__init__()
        self.shapes_only = ShapesOnly() if shapes_only else None
        self.dense = FlopCounterMode(display=False)
        self.sdpa = 0
        self.sdpa_calls = 0
        self.denoiser_calls = 0
        self.in_denoiser = (0, 0)  # (dense, sdpa) counted inside the step's denoiser calls so far
        self._call_start: tuple[int, int] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value")
            q, k, v = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))
            self.sdpa += sdpa_flops(q, k, v)
            self.sdpa_calls += 1
            if self.shapes_only is not None:
                rows = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
                device = next((x.device for x in (q, k, v) if not x.is_meta), torch.device("cpu"))
                return torch.zeros(*rows, q.shape[-2], v.shape[-1], dtype=q.dtype, device=device)
            with _disable_current_modes():  # FlopCounterMode paused: the rule above is the call's count
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    def start(self) -> None:
        if self.shapes_only is not None:  # outermost: FlopCounterMode sees (and counts) each op before it
            self.shapes_only.__enter__()
        self.dense.__enter__()
        self.__enter__()

    def stop(self) -> None:
        self.__exit__(None, None, None)
        self.dense.__exit__(None, None, None)
        if self.shapes_only is not None:
            self.shapes_only.__exit__(None, None, None)

    def mark_denoiser_start(self) -> None:
        self._call_start = (self.dense.get_total_flops(), self.sdpa)

    def mark_denoiser_end(self) -> None:
        """Adds the FLOPs since `mark_denoiser_start` to the step's denoiser share (one call per step on batched-CFG
        pipelines; two on Flux, its cond and uncond calls)."""
        (dense0, sdpa0), (dense, sdpa) = self._call_start, self.in_denoiser
        self.in_denoiser = (dense + self.dense.get_total_flops() - dense0, sdpa + self.sdpa - sdpa0)
        self.denoiser_calls += 1
        self._call_start = None

    def result(self) -> dict:
        dense, sdpa = self.dense.get_total_flops(), self.sdpa
        in_dense, in_sdpa = self.in_denoiser
        return {
            "total": dense + sdpa,
            "sdpa": sdpa,
            "dense": dense,
            "denoiser": in_dense + in_sdpa,
            "after_denoiser": dense + sdpa - in_dense - in_sdpa,
            "sdpa_calls": self.sdpa_calls,
            "denoiser_calls": self.denoiser_calls,
        }


class _StepCounted(Exception):
    """Raised at the scheduler step to end the call once the counted step is complete."""


def count_step(pipe, height: int, width: int, batch: int, **call_kwargs) -> dict:
    """FLOPs of the first denoising step of `pipe(...)`: every denoiser call of the step (one on the 2B batch; Flux:
    its cond call, then its uncond call), the segmentation, the rate and the combine. Also `record_bytes`: what the
    attention record holds when the segmentation reads it (after the step's denoiser calls; 0 without a segmentor;
    None on trees whose guidance has no `SpatialGuidance.masks`)."""
    denoiser = pipe.denoiser if hasattr(pipe, "denoiser") else pipe.unet  # older trees: no `denoiser`
    counter = StepCounter(shapes_only=denoiser.device.type == "meta")
    state = {"running": False, "done": False}

    def on_denoiser_start(module, args):
        if not state["running"] and not state["done"]:
            state["running"] = True
            counter.start()
        if state["running"]:
            counter.mark_denoiser_start()

    def on_denoiser_end(module, args, output):
        if state["running"]:
            counter.mark_denoiser_end()

    def scheduler_step(*args, **kwargs):
        counter.stop()
        state["running"], state["done"] = False, True
        raise _StepCounted

    hooks = [denoiser.register_forward_pre_hook(on_denoiser_start), denoiser.register_forward_hook(on_denoiser_end)]
    pipe.scheduler.step = scheduler_step  # instance attribute: shadows the method for this call only
    try:
        with recorded_bytes() as held:
            pipe(
                [PROMPT] * batch,
                height=height,
                width=width,
                num_inference_steps=1,
                guidance_scale=7.5,
                output_type="latent",
                **{**_call_kwargs(pipe, batch), **call_kwargs},
            )
    except _StepCounted:
        pass
    else:
        raise RuntimeError("the pipeline call ended without a scheduler step: no denoising step was counted")
    finally:
        del pipe.scheduler.step
        for hook in hooks:
            hook.remove()
        if state["running"]:
            counter.stop()
    held, fields = held.largest() if held is not None else (None, None)
    return {**counter.result(), "record_bytes": held, "record_fields": fields}


class RecordSizes:
    """What `recorded_bytes` saw: per segmentation read, the record's bytes in all (`totals`) and per kind of tensor
    (`fields`: q, k, o, reduced, k_rest; a tensor two views share counted once)."""

    def __init__(self) -> None:
        self.totals: list[int] = []
        self.fields: list[dict[str, int]] = []

    def read(self, record) -> None:
        self.totals.append(record.nbytes())
        seen, by_field = set(), {}
        for layer in record.layers.values():
            for name in ("q", "k", "o", "reduced", "k_rest"):
                x = getattr(layer, name, None)
                if x is not None and id(x) not in seen:
                    seen.add(id(x))
                    by_field[name] = by_field.get(name, 0) + x.numel() * x.element_size()
        self.fields.append(by_field)

    def largest(self) -> tuple[int, dict[str, int]]:
        """(bytes, bytes per field) of the largest read; (0, {}) when nothing was segmented."""
        if not self.totals:
            return 0, {}
        i = max(range(len(self.totals)), key=self.totals.__getitem__)
        return self.totals[i], self.fields[i]


@contextmanager
def recorded_bytes():
    """Yields a `RecordSizes` that notes the attention record each time the segmentation reads it
    (`SpatialGuidance.masks`, patched on the class for the block): the record as it is held between the step's
    denoiser calls and the segmentation, in the dtypes the model records. None on trees without that method."""
    try:
        from goca_scfg.guidance import SpatialGuidance
    except ImportError:
        SpatialGuidance = None
    masks = getattr(SpatialGuidance, "masks", None)
    if masks is None:
        yield None
        return
    sizes = RecordSizes()

    def reading(self, step, record):
        sizes.read(record)
        return masks(self, step, record)

    SpatialGuidance.masks = reading
    try:
        yield sizes
    finally:
        SpatialGuidance.masks = masks


def method_kwargs(name: str) -> dict:
    """Pipeline keyword arguments of a method: goca_scfg.vocab's where it exists, else the defaults of the named
    segmentor (trees older than the vocabulary module: the same defaults)."""
    try:
        from goca_scfg.vocab import get_method
    except ImportError:
        return {"segmentor": {"cfg": None}.get(name, name)}
    return get_method(name).pipeline_kwargs()


# Trees older than the family registry (goca_scfg/families/, for before/after runs): arch → (pipeline class,
# tiny builder, real-size builder) by name in goca_scfg and goca_scfg.testing; their denoiser is a UNet.
_LEGACY_ARCHS = {
    "sd15": ("StableDiffusionSCFGPipeline", "tiny_components", "sd15_random_components"),
    "sdxl": ("StableDiffusionXLSCFGPipeline", "tiny_xl_components", "sdxl_random_components"),
}


def _registry():
    """The model family registry of the goca_scfg being counted, or None for a tree older than it. (An editable
    install would otherwise hand this checkout's goca_scfg.families to an older tree put first on PYTHONPATH.)"""
    import goca_scfg

    try:
        import goca_scfg.families as families
    except ImportError:
        return None
    same_tree = os.path.dirname(os.path.dirname(families.__file__)) == os.path.dirname(goca_scfg.__file__)
    return families if same_tree else None


def arch_names() -> tuple[str, ...]:
    """The `--arch` choices: the registered model families (the legacy pair on older trees)."""
    registry = _registry()
    return registry.family_names() if registry else tuple(_LEGACY_ARCHS)


def _arch(arch: str, tiny: bool):
    """(pipeline class, component builder, denoiser component name, default sizes, methods it runs or None) of an
    architecture."""
    registry = _registry()
    if registry is None:
        return _legacy_arch(arch, tiny)
    family = registry.family_named(arch)
    build = registry.resolve(family.tiny_components if tiny else family.random_components)
    return family.pipeline_class(), build, family.denoiser, family.bench.flops_sizes, family.bench.methods


def _legacy_arch(arch: str, tiny: bool):
    """`_arch` on a tree without goca_scfg.families."""
    import goca_scfg
    import goca_scfg.testing as testing

    if arch not in _LEGACY_ARCHS:
        raise ValueError(f"unknown arch {arch!r} in a tree without goca_scfg.families; use {tuple(_LEGACY_ARCHS)}")
    cls, small, big = _LEGACY_ARCHS[arch]
    build = getattr(testing, small if tiny else big)
    return getattr(goca_scfg, cls), lambda: build(scheduler="ddim"), "unet", "1024" if arch == "sdxl" else None, None


def _call_kwargs(pipe, batch: int) -> dict:
    """Keywords every counted call of this pipeline takes (its family's bench `call_kwargs`; none on older trees),
    for `batch` prompts: a negative prompt given as one string becomes one per prompt (Flux's true CFG)."""
    registry = _registry()
    return bench_call_kwargs(registry.family_of(pipe), batch) if registry else {}


def bench_call_kwargs(family, batch: int) -> dict:
    """A family's bench `call_kwargs` for a call on `batch` prompts: string negative prompts as a list of `batch`
    (stock `FluxPipeline` encodes a string negative prompt once, whatever the number of prompts, and its uncond
    call then fails on the batch mismatch)."""
    kwargs = dict(family.bench.call_kwargs)
    for name in ("negative_prompt", "negative_prompt_2", "negative_prompt_3"):
        if isinstance(kwargs.get(name), str):
            kwargs[name] = [kwargs[name]] * batch
    return kwargs


def build_pipeline(arch: str, mode: str = "shapes", tiny: bool = False):
    """A random-weight pipeline of the architecture's real sizes (or the tiny one) on the CPU, in the dtype its
    builder makes (bf16 for SD3 and Flux, fp32 for the others); in "shapes" mode its denoiser is on the meta device
    (never materialised) and its scheduler is DDIM, or the model's own where it is flow matching (its pipeline passes
    sigmas and shifts DDIM does not take); see the module docstring."""
    from diffusers import DDIMScheduler

    cls, build, denoiser, _, _ = _arch(arch, tiny)
    if mode == "real":
        pipe = cls(**build())
    else:
        with torch.device("meta"):
            components = build()  # every module on meta; all but the denoiser rebuilt on the CPU
        torch.manual_seed(0)
        for name, module in components.items():
            if isinstance(module, torch.nn.Module) and name != denoiser:
                dtype = next(module.parameters()).dtype  # the builder's (the denoiser reads their outputs)
                rebuilt = (
                    type(module).from_config(module.config)
                    if hasattr(module, "from_config")
                    else type(module)(module.config)
                )
                if next(rebuilt.parameters()).dtype != dtype:
                    rebuilt = rebuilt.to(dtype)
                components[name] = rebuilt.eval()
        # DDIM on the model's own noise schedule (no scheduler adds counted FLOPs; the step ends the count)
        if "FlowMatch" not in type(components["scheduler"]).__name__:
            components["scheduler"] = DDIMScheduler.from_config(components["scheduler"].config, clip_sample=False)
        pipe = cls(**components)
        set_timesteps = pipe.scheduler.set_timesteps  # timesteps stay CPU values (the loop reads int(t))

        @functools.wraps(set_timesteps)  # keeps the signature: diffusers' retrieve_timesteps inspects it
        def on_cpu(*args, device=None, **kwargs):
            return set_timesteps(*args, **kwargs)

        pipe.scheduler.set_timesteps = on_cpu
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_weight_bytes(pipe) -> int:
    """Bytes of the denoiser's parameters at 16 bits each (fp16/bf16; counted from shapes, also on meta)."""
    denoiser = pipe.denoiser if hasattr(pipe, "denoiser") else pipe.unet
    return 2 * sum(p.numel() for p in denoiser.parameters())


def count_table(pipe, cases: list[tuple[int, int, int]], methods: list[str]) -> list[dict]:
    """One row per (height, width, batch) case and method: the step's FLOPs and their ratios to plain CFG (the
    first method), and the attention record's size at the segmentation against the denoiser's 16-bit weights."""
    rows = []
    weights = denoiser_weight_bytes(pipe)
    for height, width, batch in cases:
        base = None
        for method in methods:
            start = time.perf_counter()
            flops = count_step(pipe, height, width, batch, **method_kwargs(method))
            base = base or flops
            row = {"size": f"{height}x{width}", "batch": batch, "method": method, **flops}
            row["total_ratio"] = flops["total"] / base["total"]
            row["sdpa_ratio"] = flops["sdpa"] / base["sdpa"] if base["sdpa"] else None
            row["weights_16bit_bytes"] = weights
            held = flops["record_bytes"]
            row["record_of_weights"] = held / weights if held is not None else None
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    unit, scale = ("TFLOP", 1e12) if row["total"] >= 1e11 else ("GFLOP", 1e9)
    sdpa_ratio = f"{row['sdpa_ratio']:.3f}x" if row["sdpa_ratio"] else "-"
    held = row.get("record_bytes")
    record = "" if held is None else f"  record {held / 2**20:.1f} MiB ({100 * row['record_of_weights']:.1f} % of W16)"
    return (
        f"{row['size']:>10} b{row['batch']} {row['method']:>10}  total {row['total'] / scale:8.3f} {unit} "
        f"({row['total_ratio']:.3f}x)  SDPA {row['sdpa'] / scale:7.3f} ({sdpa_ratio}, {row['sdpa_calls']} calls)  "
        f"dense {row['dense'] / scale:7.3f}  denoiser {row['denoiser'] / scale:7.3f} "
        f"({row.get('denoiser_calls', 1)} call{'s' if row.get('denoiser_calls', 1) != 1 else ''})  "
        f"after it {row['after_denoiser'] / scale:7.4f}{record}  [{row['seconds']:.1f} s]"
    )


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        h, _, w = item.strip().partition("x")
        sizes.append((int(h), int(w or h)))
    return sizes


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    archs = arch_names()
    parser.add_argument("--arch", choices=archs, default=archs[0], help="a registered model family")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model of the architecture")
    parser.add_argument("--mode", choices=("shapes", "real"), default="shapes", help="see the module docstring")
    parser.add_argument("--sizes", default=None, help="comma list of SIZE[xW]; default by --arch (sd15: 512,768,1024)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (the denoiser sees twice as many)")
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma list, plain CFG first (default: {','.join(METHODS)}, those the arch runs)",
    )
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    _, _, _, default_sizes, runs = _arch(args.arch, args.tiny)
    sizes = parse_sizes(args.sizes or default_sizes or "512,768,1024")
    methods = (
        [m.strip() for m in args.methods.split(",")]
        if args.methods
        else [m for m in METHODS if m in (runs or METHODS)]
    )
    if methods[0] != "cfg":
        parser.error(f"--methods must start with cfg (the baseline); got {methods}")
    import goca_scfg

    print(f"# FLOPs per denoising step; goca_scfg at {goca_scfg.__file__}; torch {torch.__version__}; {args}")
    cases = [(h, w, args.batch) for h, w in sizes]
    rows = count_table(build_pipeline(args.arch, args.mode, args.tiny), cases, methods)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
