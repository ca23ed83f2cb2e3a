"""Seconds per denoising step, per stage, and peak memory of S-CFG and GoCA against plain CFG, interleaved in one
process: the protocol for costs that depend on memory traffic as much as on FLOPs.

Every round runs one call of `--steps` denoising steps (default 1: one denoiser call on the CFG batch) of each method
in turn, after one warm-up call each, so that load on a shared machine hits every method alike. Reported per method:
the minimum over rounds of its seconds per step and its ratio to CFG's minimum, the ratio in each round to that
round's CFG call (on a machine whose load changes between rounds the per-round ratios are the fairer reading), the
denoiser call alone (timed by hooks on the denoiser: the capture's hooks and in-forward reductions run inside it),
and the bytes the attention record holds when the segmentation reads it. `--profile` adds the `goca_scfg::*` stages
(torch.profiler) of one call per segmenting method. `--memory` first runs each method once in a fresh process and
reports its peak (peak RSS on the CPU, the whole process with its weights; peak allocated CUDA memory on a GPU).
Models, call keywords and the method names are bench_guidance.py's (`--arch`, `--tiny`, `--model`); the label
agreement of the fast mode is bench_guidance.py's `--agreement`.

  python bench/bench_interleaved.py                              # SD v1.5 512² b1, cfg/goca/goca-fast/scfg, 3 rounds
  python bench/bench_interleaved.py --profile --memory           # + stages and peak memory per method
  python bench/bench_interleaved.py --arch sdxl --size 1024 --methods cfg,goca
  python bench/bench_interleaved.py --methods cfg,goca-fast --steps 5   # fast mode: layer weights every 5th step
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ is no package: its sibling bench_guidance
import step_flops  # noqa: E402
from bench_guidance import ARCHS, Case, _sync, build_pipeline, profile_stages, run_once  # noqa: E402

from goca_scfg.vocab import BASELINE, DTYPE_NAMES, METHOD_NAMES, get_method  # noqa: E402


class DenoiserClock:
    """Seconds of every denoiser forward call (forward pre/post hooks; synchronised on a GPU)."""

    def __init__(self, pipe, device: str) -> None:
        self.device, self.seconds, self._start = device, [], 0.0
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
        self._handles = [
            denoiser.register_forward_pre_hook(lambda *_: self._begin()),
            denoiser.register_forward_hook(lambda *_: self._end()),
        ]

    def _begin(self) -> None:
        _sync(self.device)
        self._start = time.perf_counter()

    def _end(self) -> None:
        _sync(self.device)
        self.seconds.append(time.perf_counter() - self._start)

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def step_seconds(pipe, args, method: str) -> float:
    """Seconds per denoising step of one `--steps`-step latent-output call of `method` (`run_once`)."""
    return run_once(pipe, Case(args.size, args.size, args.batch), method, args.steps, args.device)[0] / args.steps


def stages(pipe, args, method: str) -> dict[str, float]:
    """Milliseconds per step of each `goca_scfg::*` stage in one call, no warm-up (`profile_stages`)."""
    one_call = argparse.Namespace(**{**vars(args), "warmup_steps": 0, "profile_steps": args.steps})
    profiled = profile_stages(pipe, Case(args.size, args.size, args.batch), method, one_call)
    return {key.removeprefix("goca_scfg::"): ms for key, ms in profiled.items()}


def peak_memory(args, method: str) -> float:
    """Peak memory (GiB) of a fresh process that builds the pipeline and runs one call of `method`."""
    cmd = [sys.executable, os.path.abspath(__file__), "--single", method, "--arch", args.arch]
    cmd += ["--size", str(args.size), "--batch", str(args.batch), "--device", args.device, "--dtype", args.dtype]
    cmd += ["--steps", str(args.steps)]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--model", args.model] if args.model else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def single(args) -> None:
    """--single METHOD: one call in this fresh process; prints its peak memory in GiB."""
    pipe = build_pipeline(args)
    _, cuda_peak = run_once(pipe, Case(args.size, args.size, args.batch), args.single, args.steps, args.device)
    print(cuda_peak if cuda_peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # KiB


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=tuple(ARCHS), default=ARCHS[next(iter(ARCHS))].name)
    parser.add_argument("--tiny", action="store_true", help="the tiny random model (smoke mode)")
    parser.add_argument("--model", default=None, help="real weights (hub id or path); default: random weights")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    parser.add_argument("--methods", default="cfg,goca,goca-fast,scfg", help=f"comma list of {','.join(METHOD_NAMES)}")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the minimum is reported)")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps per timed call (times are per step)")
    parser.add_argument("--profile", action="store_true", help="per-stage ms of one call per segmenting method")
    parser.add_argument("--memory", action="store_true", help="peak memory per method, a fresh process each")
    parser.add_argument("--single", choices=METHOD_NAMES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    args.scheduler = "default"
    methods = [m.strip() for m in args.methods.split(",")]
    if methods[0] != BASELINE or set(methods) - set(METHOD_NAMES) or args.rounds < 1 or args.steps < 1:
        parser.error(f"--methods must start with {BASELINE} and use {METHOD_NAMES}; --rounds and --steps >= 1")
    if args.single:
        single(args)
        return {}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    when = time.strftime("%Y-%m-%d %H:%M")
    print(f"# {device}, {torch.get_num_threads()} threads; torch {torch.__version__}; {when}")
    print(f"# {args.arch} {args.size}² b{args.batch} {args.dtype}; command: {' '.join(sys.argv)}", flush=True)
    peaks = {}
    if args.memory:  # first, while this process holds no model (two fp32 SDXL pipelines do not fit in 24 GB)
        for method in methods:
            peaks[method] = peak_memory(args, method)
            print(f"# peak memory {method}: {peaks[method]:.2f} GiB ({peaks[method] / peaks[BASELINE]:.3f}x)")
    pipe = build_pipeline(args)
    clock = DenoiserClock(pipe, args.device)
    for method in methods:  # warm-up
        step_seconds(pipe, args, method)
    calls: dict[str, list[float]] = {m: [] for m in methods}
    denoiser: dict[str, list[float]] = {m: [] for m in methods}
    record: dict[str, int] = {m: 0 for m in methods}
    for r in range(args.rounds):
        for method in methods:
            clock.seconds = []
            with step_flops.recorded_bytes() as sizes:
                calls[method].append(step_seconds(pipe, args, method))
            denoiser[method].append(sum(clock.seconds) / args.steps)
            record[method] = max(record[method], sizes.largest()[0])
        base = calls[BASELINE][-1]
        print(f"# round {r}: " + ", ".join(f"{m} {calls[m][-1]:.2f} s ({calls[m][-1] / base:.3f}x)" for m in methods))
    clock.close()
    rows = {}
    for method in methods:
        rows[method] = row = dict(
            step_s=min(calls[method]),
            ratio=min(calls[method]) / min(calls[BASELINE]),
            round_ratios=[c / b for c, b in zip(calls[method], calls[BASELINE])],
            denoiser_s=min(denoiser[method]),
            denoiser_ratio=min(denoiser[method]) / min(denoiser[BASELINE]),
            record_mib=record[method] / 2**20,
        )
        if peaks:
            row.update(peak_gib=peaks[method], peak_ratio=peaks[method] / peaks[BASELINE])
        print(
            f"{method:>10}: step {row['step_s']:7.2f} s ({row['ratio']:.3f}x; per round "
            f"{', '.join(f'{x:.3f}' for x in row['round_ratios'])}); denoiser {row['denoiser_s']:7.2f} s/step "
            f"({row['denoiser_ratio']:.3f}x); record {row['record_mib']:.1f} MiB",
            flush=True,
        )
    if args.profile:
        for method in [m for m in methods if get_method(m).segmentor is not None]:
            rows[method]["stages_ms"] = st = stages(pipe, args, method)
            print(f"# stages {method} (ms per step): " + ", ".join(f"{k} {v:.0f}" for k, v in st.items()), flush=True)
    results = {"device": device, "args": vars(args), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
