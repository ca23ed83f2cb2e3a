"""The benchmark's CPU smoke modes run end to end, and its FLOP count is right (no timing assertions: bench/ owns
timings)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("bench_guidance")


@pytest.fixture(scope="module")
def step_flops():
    return _load("step_flops")


def test_bench_tiny_smoke(bench, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--tiny", "--cases", "128b2", "--repeats", "1", "--steps", "2", "--profile", "--agreement"]
    bench.main([*argv, "--json", str(out)])
    results = json.loads(out.read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"cfg", "scfg", "goca", "goca-fast"}
    assert rows["cfg"]["time_ratio"] == 1.0 and all(r["time_ratio"] > 0 for r in rows.values())
    assert {"goca_scfg::goca_layer_weights", "goca_scfg::goca_segment", "goca_scfg::rate"} <= set(
        results["profile"]["goca"]
    )
    assert results["profile"]["scfg"]["record_mib"] > 0
    agreement = results["agreement"]["128x128 b2"]
    assert set(agreement) == {"fast", "fp16_noise"}
    assert all(len(v) > 0 and all(0 <= a <= 1 for a in v) for v in agreement.values())


def test_bench_tiny_sdxl_smoke(bench):
    argv = ["--arch", "sdxl", "--tiny", "--cases", "64b1", "--methods", "cfg,goca", "--repeats", "1", "--steps", "1"]
    results = bench.main([*argv, "--warmup-steps", "0", "--profile", "--profile-steps", "1"])
    assert results["args"]["arch"] == "sdxl"
    assert [r["method"] for r in results["rows"]] == ["cfg", "goca"]
    assert all(r["s_per_img"] > 0 and r["time_ratio"] > 0 for r in results["rows"])
    assert "goca_scfg::goca_segment" in results["profile"]["goca"]
    assert results["profile"]["goca"]["record_mib"] > 0


def test_bench_tiny_pixart_smoke(bench):
    argv = ["--arch", "pixart-sigma", "--tiny", "--cases", "64b1", "--repeats", "1", "--steps", "1"]
    results = bench.main([*argv, "--warmup-steps", "0"])
    assert [r["method"] for r in results["rows"]] == ["cfg", "goca", "goca-fast"]  # no S-CFG on a DiT
    assert all(r["s_per_img"] > 0 and r["time_ratio"] > 0 for r in results["rows"])
    flops = bench.main([*argv, "--flops"])["flops"]  # step_flops builds PixArt for this arch
    assert [r["method"] for r in flops] == ["cfg", "goca", "goca-fast"] and flops[1]["total"] > flops[0]["total"]
    results = bench.main([*argv, "--warmup-steps", "0", "--profile", "--profile-steps", "1", "--agreement"])
    assert "goca_scfg::goca_segment" in results["profile"]["goca"] and results["profile"]["goca"]["record_mib"] > 0
    (agreement,) = results["agreement"].values()
    assert len(agreement["fast"]) >= 1 and all(0 <= v <= 1 for v in agreement["fast"] + agreement["fp16_noise"])


def test_bench_tiny_flux_smoke(bench):
    """Flux's true CFG (two transformer calls per step) at b2: the family's empty negative prompt goes in as one per
    prompt (stock Flux fails on one string for two prompts); the fast-mode agreement segments its cond call's record
    (joint attention: a raw record every plan reads)."""
    argv = ["--arch", "flux", "--tiny", "--cases", "64b2", "--repeats", "1", "--steps", "1", "--warmup-steps", "0"]
    results = bench.main([*argv, "--agreement", "--agreement-steps", "2"])
    assert [r["method"] for r in results["rows"]] == ["cfg", "goca"]  # the family's methods: no S-CFG
    assert all(r["s_per_img"] > 0 and r["time_ratio"] > 0 for r in results["rows"])
    agreement = results["agreement"]["64x64 b2"]
    assert all(len(v) == 2 and all(0 <= a <= 1 for a in v) for v in agreement.values())


def test_sdpa_rule_is_the_math_paths_count(step_flops):
    """The explicit rule equals what FlopCounterMode counts where SDPA runs as explicit matmuls (the math path)."""
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 16)  # d_v != d_qk: math path
    counter = FlopCounterMode(display=False)
    with counter:
        F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == step_flops.sdpa_flops(q, k, v) == 2 * 6 * 5 * 7 * (8 + 16)


KEYS = ("total", "sdpa", "dense", "denoiser", "after_denoiser", "sdpa_calls", "denoiser_calls", "record_bytes")


@pytest.mark.parametrize(
    "arch, methods",
    [
        ("sd15", ["cfg", "scfg", "goca"]),
        ("sdxl", ["cfg", "goca"]),
        ("pixart-sigma", ["cfg", "goca"]),
        ("sd3", ["cfg", "goca"]),
        ("flux", ["cfg", "goca"]),  # true CFG: two transformer calls per step, list negative prompts at b2
    ],
)
def test_shapes_only_count_equals_real_count(step_flops, arch, methods):
    """Counting with a meta denoiser and shape-only ops gives exactly the count of the real computation, and the
    same record size at the segmentation (the record's tensors keep the model's shapes and dtypes)."""
    cases = [(64, 64, 2)]
    shapes = step_flops.count_table(step_flops.build_pipeline(arch, "shapes", tiny=True), cases, methods)
    real = step_flops.count_table(step_flops.build_pipeline(arch, "real", tiny=True), cases, methods)
    assert [{k: r[k] for k in KEYS} for r in shapes] == [{k: r[k] for k in KEYS} for r in real]
    rows = dict(zip(methods, shapes))
    cfg, goca = rows["cfg"], rows["goca"]
    assert cfg["after_denoiser"] == 0 and cfg["sdpa"] > 0 and cfg["dense"] > 0 and cfg["record_bytes"] == 0
    assert goca["after_denoiser"] > 0 and goca["total_ratio"] > 1 and goca["record_bytes"] > 0
    # one batched [uncond; cond] call per step; Flux's true CFG: the cond call, then the uncond call
    assert cfg["denoiser_calls"] == goca["denoiser_calls"] == (2 if arch == "flux" else 1)
    assert goca["denoiser"] >= cfg["denoiser"]  # plus the capture's in-forward reducers, where there are any
    # GoCA removes no attention call; it may add some (UNet reducers, propagation) or form small maps explicitly
    assert goca["sdpa_calls"] >= cfg["sdpa_calls"] and goca["sdpa"] >= cfg["sdpa"]
    if "scfg" in rows:  # S-CFG adds no attention call, only its segmentation after the denoiser
        assert rows["scfg"]["sdpa"] == cfg["sdpa"] and rows["scfg"]["after_denoiser"] > 0


def test_bench_flops_flag(bench, tmp_path):
    out = tmp_path / "flops.json"
    bench.main(["--flops", "--tiny", "--cases", "64b1,64x128b2", "--methods", "cfg,scfg", "--json", str(out)])
    rows = json.loads(out.read_text())["flops"]
    assert [(r["size"], r["batch"], r["method"]) for r in rows] == [
        ("64x64", 1, "cfg"), ("64x64", 1, "scfg"), ("64x128", 2, "cfg"), ("64x128", 2, "scfg")
    ]  # fmt: skip
    assert rows[0]["total_ratio"] == 1.0 and rows[1]["total"] > rows[0]["total"]
    assert rows[2]["denoiser"] > 3 * rows[0]["denoiser"]  # twice the batch, twice the pixels


def test_bench_interleaved_tiny_smoke(tmp_path):
    """The interleaved protocol runs end to end on the tiny model: per-method ratios to CFG of the same rounds, the
    record CFG does not hold and GoCA does, and the stages."""
    interleaved = _load("bench_interleaved")
    out = tmp_path / "interleaved.json"
    argv = ["--tiny", "--size", "64", "--batch", "2", "--methods", "cfg,goca,scfg", "--rounds", "2"]
    interleaved.main([*argv, "--profile", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["cfg", "goca", "scfg"]
    assert rows["cfg"]["ratio"] == 1.0 and rows["cfg"]["round_ratios"] == [1.0, 1.0]
    assert all(len(r["round_ratios"]) == 2 and r["step_s"] > 0 and r["denoiser_s"] > 0 for r in rows.values())
    assert rows["cfg"]["record_mib"] == 0 and rows["goca"]["record_mib"] > rows["scfg"]["record_mib"] > 0
    assert {"goca_layer_weights", "goca_segment", "rate"} <= set(rows["goca"]["stages_ms"])
    assert "stages_ms" not in rows["cfg"] and "peak_gib" not in rows["cfg"]


@pytest.mark.slow
def test_bench_interleaved_memory_fresh_processes():
    """--memory: each method's peak in a fresh process, as ratios to CFG's."""
    interleaved = _load("bench_interleaved")
    rows = interleaved.main(["--tiny", "--size", "64", "--methods", "cfg,goca", "--rounds", "1", "--memory"])["rows"]
    assert rows["cfg"]["peak_ratio"] == 1.0 and rows["goca"]["peak_gib"] > 0.1
