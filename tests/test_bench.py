"""The benchmark's CPU smoke mode runs end to end (no timing assertions: bench/ owns timings)."""

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_guidance.py"


def test_bench_tiny_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_guidance", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_guidance"] = bench  # dataclasses look their module up
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.modules.pop("bench_guidance", None)
    out = tmp_path / "bench.json"
    argv = [
        "--tiny",
        "--cases",
        "128b2",
        "--repeats",
        "1",
        "--steps",
        "2",
        "--profile",
        "--agreement",
        "--json",
        str(out),
    ]
    bench.main(argv)
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
