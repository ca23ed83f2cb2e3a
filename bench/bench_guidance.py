"""Time and peak memory of S-CFG and GoCA guidance against plain CFG, measured in the same run on one device.

Builds a pipeline of real size with random weights of a registered model family (goca_scfg/families/; `--arch sd15`:
the published SD v1.5 UNet / VAE / text-encoder configs; `--arch sdxl`: SDXL base 1.0's; `--arch pixart-sigma`:
PixArt-Sigma-XL-2's transformer; `--arch sd3`: SD3.5-medium's MMDiT; `--arch flux`: FLUX.1-dev's transformer, true
CFG; random weights time exactly like real ones), or loads real weights with --model (the SCFG pipeline class is
picked from its model_index.json). The family also gives the default cases, steps, dtype and methods, and the
keywords of every call (Flux: `true_cfg_scale=4.0` and an empty negative prompt, one per prompt). Builders that take
a device and dtype (SD3, Flux) build the random weights directly there, in that dtype (FLUX.1-dev's 11.9B
parameters never exist in fp32 or on the host).
For every case (size × batch) and method it reports the median seconds per image over repeats, the peak device
memory, and both as ratios to plain CFG (`segmentor=None`). With --profile it attributes the per-step cost of the
segmentation stages (torch.profiler labels `goca_scfg::*`). With --agreement it measures the per-step label
agreement of GoCA's fast mode against the exact mode on the same recorded maps. With --flops it counts, instead of
timing, the FLOPs of one denoising step per case and method (bench/step_flops.py; no GPU needed).

  python bench/bench_guidance.py --tiny                  # CPU smoke mode: seconds (--arch sdxl: tiny SDXL)
  python bench/bench_guidance.py --device cuda           # SD v1.5 cases of the GPU run (fp16, 50 steps)
  python bench/bench_guidance.py --device cuda --arch sdxl   # SDXL 1024² b1, its Euler scheduler
  python bench/bench_guidance.py --device cuda --arch flux   # FLUX.1-dev 1024² b1, bf16, 28 steps, cfg and goca
  python bench/bench_guidance.py --arch sd3 --tiny           # CPU smoke mode of a joint-attention family
  python bench/bench_guidance.py --flops --cases 512b1,768b1,1024b1  # FLOPs per step: no GPU, minutes on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from goca_scfg.capture import AttentionRecord, LayerTensors
from goca_scfg.families import FAMILIES, Family, family_of, resolve
from goca_scfg.guidance import RateRule
from goca_scfg.layout import ModelLayout
from goca_scfg.loading import load_pipeline, model_family, swap_scheduler
from goca_scfg.segment import make_segmentor
from goca_scfg.vocab import BASELINE, DTYPE_NAMES, METHOD_NAMES, SCHEDULER_NAMES, get_method, torch_dtype

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ is no package: its sibling step_flops
import step_flops  # noqa: E402

DEFAULT_METHODS = (BASELINE, "scfg", "goca", "goca-fast")
# --arch → model family (goca_scfg/families/): pipeline class, real-size and tiny random components, default cases,
# steps and dtype, the methods it can run, whether --profile/--agreement run on it, extra call keywords
ARCHS: dict[str, Family] = {family.name: family for family in FAMILIES}
PROMPT = "a photograph of an astronaut riding a horse on the beach"


@dataclass
class Case:
    height: int
    width: int
    batch: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width} b{self.batch}"


def build_pipeline(args):
    dtype = torch_dtype(args.dtype)
    family = ARCHS[args.arch]
    if args.tiny:
        pipe = family.pipeline_class()(**family.build_tiny_components()).to(args.device)
    elif args.model:
        pipe = load_pipeline(args.model, torch_dtype=dtype, device=args.device)
    elif {"device", "dtype"} <= set(inspect.signature(resolve(family.random_components)).parameters):
        # built directly in the dtype on the device (FLUX.1-dev's 11.9B parameters: no fp32 copy on the host)
        pipe = family.pipeline_class()(**family.build_random_components(device=args.device, dtype=dtype))
    else:
        pipe = family.pipeline_class()(**family.build_random_components()).to(device=args.device, dtype=dtype)
    swap_scheduler(pipe, args.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _generate(pipe, case: Case, steps: int, **kwargs) -> None:
    """One latent-output call at the case's size and batch, one seeded generator per image."""
    pipe(
        [PROMPT] * case.batch,
        height=case.height,
        width=case.width,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(i) for i in range(case.batch)],
        output_type="latent",
        **{**step_flops.bench_call_kwargs(family_of(pipe), case.batch), **kwargs},
    )


def run_once(pipe, case: Case, method: str, steps: int, device: str) -> tuple[float, float | None]:
    """Seconds for one call and peak device memory (GiB; None on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    _generate(pipe, case, steps, **get_method(method).pipeline_kwargs())
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return seconds, peak


def measure(pipe, cases: list[Case], methods: list[str], args) -> list[dict]:
    rows = []
    for case in cases:
        base_time = base_mem = None
        for method in methods:
            try:
                if args.warmup_steps:  # warm-up (kernels, allocator); 0: none (slow CPU runs)
                    run_once(pipe, case, method, args.warmup_steps, args.device)
                runs = [run_once(pipe, case, method, args.steps, args.device) for _ in range(args.repeats)]
            except torch.cuda.OutOfMemoryError:
                rows.append(dict(case=case.name, method=method, error="out of memory"))
                continue
            sec = statistics.median(r[0] for r in runs) / case.batch
            mem = max(r[1] for r in runs) if runs[0][1] is not None else None
            if method == BASELINE:
                base_time, base_mem = sec, mem
            row = dict(case=case.name, method=method, s_per_img=sec, peak_gib=mem)
            row["time_ratio"] = sec / base_time if base_time else None
            row["mem_ratio"] = mem / base_mem if (mem is not None and base_mem) else None
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


def _fmt(row: dict) -> str:
    if "error" in row:
        return f"{row['case']:>14} {row['method']:>10}  {row['error']}"
    mem = f"{row['peak_gib']:.2f} GiB" if row["peak_gib"] is not None else "n/a"
    tr = f"{row['time_ratio']:.3f}x" if row["time_ratio"] else "-"
    mr = f"{row['mem_ratio']:.3f}x" if row["mem_ratio"] else "-"
    return f"{row['case']:>14} {row['method']:>10}  {row['s_per_img']:.4f} s/img ({tr})  peak {mem} ({mr})"


def profile_stages(pipe, case: Case, method: str, args) -> dict[str, float]:
    """Per-step milliseconds of each `goca_scfg::*` stage and of the UNet call, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    if args.warmup_steps:
        run_once(pipe, case, method, args.warmup_steps, args.device)
    with profile(activities=activities) as prof:
        run_once(pipe, case, method, args.profile_steps, args.device)
    out = {}
    for evt in prof.key_averages():
        if evt.key.startswith("goca_scfg::"):
            device_us = getattr(evt, "device_time_total", 0) or 0
            total = max(evt.cpu_time_total, device_us)
            out[evt.key] = total / 1000 / args.profile_steps
    return out


def capture_bytes(pipe, case: Case, method: str) -> int:
    """Bytes the attention record holds when the segmentation reads it (after the step's denoiser calls: the
    capture's extra memory per step), in a one-step call of the method."""
    with step_flops.recorded_bytes() as sizes:
        _generate(pipe, case, 1, **get_method(method).pipeline_kwargs())
    return sizes.largest()[0]


def _rounded_record(record: AttentionRecord) -> AttentionRecord:
    """A copy of the record with every tensor rounded through fp16: the noise of running the maps in half precision."""

    def rounded(t):
        return None if t is None else t.half().to(t.dtype)

    fields = [f for f in ("q", "k", "o", "reduced", "k_rest") if hasattr(LayerTensors, f)]
    return AttentionRecord(
        {name: dataclasses.replace(t, **{f: rounded(getattr(t, f)) for f in fields})
         for name, t in record.layers.items()}
    )  # fmt: skip


@dataclass(frozen=True)
class _PlainRate(RateRule):
    """r ≡ 1: ε̂ = ε_u + w·Δ, plain CFG (the segmentation runs, the trajectory is CFG's)."""

    def __call__(self, delta, masks, fg, guidance_scale):
        return torch.ones_like(fg, dtype=torch.float32)


def label_agreement(pipe, case: Case, args) -> dict[str, list[float]]:
    """Per-step fraction of latent pixels whose GoCA label agrees with the exact mode's.

    "fast": GoCA's fast mode; "fp16_noise": the exact mode on the same maps rounded to fp16 (a noise floor: how
    often labels flip under precision noise alone). One call of exact GoCA with the rate ≡ 1 (plain CFG's
    trajectory) builds its plan as every pipeline does (the cond rows of a batched call; Flux: its cond call, the
    T5 key mask, SD3: its CLIP columns); the other plans are built from the same arguments and segment each step's
    record as exact GoCA reads it, so only the approximation differs. All plans record the same layers with the same
    reducers (fast mode changes no head aggregation); on joint attention, whose in-forward passes are kept by the
    segmentor that made them, none: every plan makes its passes from the raw record (more memory, same masks).
    """
    agreement: dict[str, list[float]] = {"fast": [], "fp16_noise": []}
    plan_spatial_guidance = pipe.spatial_guidance
    joint = ModelLayout.of(pipe.denoiser).arch == "joint"

    def spatial_guidance(segmentor, *a, **kw):
        exact = plan_spatial_guidance(segmentor, *a, **kw)
        if joint:  # its in-forward passes live in the exact segmentor: record raw q and keys, every plan reads them
            exact.plan = dataclasses.replace(exact.plan, reducers={})
        kw = {**kw, "return_maps": False, "rate_rule": None}
        others = {
            "fast": plan_spatial_guidance(make_segmentor(**get_method("goca-fast").pipeline_kwargs()), *a, **kw),
            "fp16_noise": plan_spatial_guidance(make_segmentor(**get_method("goca").pipeline_kwargs()), *a, **kw),
        }
        segment = exact.masks

        def masks(step, record):
            result = segment(step, record)
            reference = result[0].argmax(1)
            for name, plan in others.items():
                source = _rounded_record(record) if name == "fp16_noise" else record
                labels = plan.masks(step, source)[0].argmax(1)
                agreement[name].append((labels == reference).float().mean().item())
            return result

        exact.masks = masks
        return exact

    pipe.spatial_guidance = spatial_guidance  # instance attribute: this call only
    try:
        _generate(pipe, case, args.agreement_steps, **get_method("goca").pipeline_kwargs(), rate_rule=_PlainRate())
    finally:
        del pipe.spatial_guidance
    return agreement


def parse_cases(text: str) -> list[Case]:
    cases = []
    for item in text.split(","):
        size, batch = item.strip().split("b")
        h, _, w = size.partition("x")
        cases.append(Case(int(h), int(w or h), int(batch)))
    return cases


def count_flops(args, cases: list[Case], methods: list[str]) -> dict:
    """FLOPs of one denoising step per case and method (bench/step_flops.py, shapes only: no GPU, seconds)."""
    if args.model:
        raise SystemExit("--flops counts the random-weight architectures (--arch); --model is not used")
    print(f"# FLOPs per denoising step; arch {args.arch}{' (tiny)' if args.tiny else ''}; torch {torch.__version__}")
    pipe = step_flops.build_pipeline(args.arch, "shapes", args.tiny)
    rows = step_flops.count_table(pipe, [(c.height, c.width, c.batch) for c in cases], methods)
    results = {"args": vars(args), "flops": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arch_help = (
        f"model family (default: --model's, else {FAMILIES[0].name}); it sets the default cases, steps, methods"
    )
    parser.add_argument("--arch", choices=tuple(ARCHS), default=None, help=arch_help)
    parser.add_argument("--tiny", action="store_true", help="tiny random model on the CPU, a few steps (smoke mode)")
    parser.add_argument("--model", default=None, help="real weights (hub id or path); default: random weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default by --arch (fp16)")
    parser.add_argument("--scheduler", choices=SCHEDULER_NAMES, default="default")
    parser.add_argument("--cases", default=None, help="comma list of SIZE[xW]bBATCH; default by --arch")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {','.join(METHOD_NAMES)}")
    parser.add_argument("--steps", type=int, default=None, help="default by --arch (50)")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="per-stage profile of scfg and goca")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--agreement", action="store_true", help="fast-mode label agreement vs exact mode")
    parser.add_argument("--agreement-steps", type=int, default=20)
    parser.add_argument("--flops", action="store_true", help="count FLOPs per denoising step instead of timing")
    parser.add_argument("--json", default=None, help="write all results to this JSON file")
    args = parser.parse_args(argv)
    if args.arch is None:
        args.arch = model_family(args.model).name if args.model else FAMILIES[0].name
    shapes = ARCHS[args.arch].bench
    if args.tiny:
        args.device, args.dtype = "cpu", "fp32"
        if args.cases is None:
            args.cases = "128b1,128b2"
        if args.steps is None:
            args.steps = 3
        args.warmup_steps, args.profile_steps, args.agreement_steps = 1, 2, min(args.agreement_steps, 4)
        args.repeats = min(args.repeats, 2)
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    args.steps = shapes.steps if args.steps is None else args.steps
    args.dtype = args.dtype or shapes.dtype
    if shapes.methods and args.methods == parser.get_default("methods"):
        args.methods = ",".join(shapes.methods)
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = set(methods) - set(METHOD_NAMES)
    if unknown or methods[0] != BASELINE:
        parser.error(f"--methods must start with {BASELINE} (the baseline) and use {METHOD_NAMES}; got {methods}")
    cases = parse_cases(args.cases or shapes.cases)
    if args.flops:
        return count_flops(args, cases, methods)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# device: {device_name}; arch {args.arch}; dtype {args.dtype}; scheduler {args.scheduler}", end="")
    print(f"; steps {args.steps}")
    print(f"# torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; command: {' '.join(sys.argv)}")
    pipe = build_pipeline(args)
    results: dict = {"device": device_name, "args": vars(args), "rows": measure(pipe, cases, methods, args)}
    if args.profile:
        results["profile"] = {}
        for method in [m for m in methods if get_method(m).segmentor is not None]:
            stages = profile_stages(pipe, cases[0], method, args)
            held = capture_bytes(pipe, cases[0], method)
            results["profile"][method] = {**stages, "record_mib": held / 2**20}
            text = ", ".join(f"{k}={v:.2f}" for k, v in stages.items())
            print(f"# profile {cases[0].name} {method} (ms/step): {text}; record holds {held / 2**20:.1f} MiB")
    if args.agreement:
        results["agreement"] = {}
        for case in cases[:1]:
            agree = label_agreement(pipe, case, args)
            results["agreement"][case.name] = agree
            for name, values in agree.items():
                print(f"# label agreement with exact GoCA, {name}, {case.name}: {[round(v, 4) for v in values]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
