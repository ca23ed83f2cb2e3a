"""Sweep (eval/sweep.py) with the tiny pipeline: expected files and manifest, a real kill then resume, shards that
add up to the unsharded set, seeds, and manifest consistency."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval import io, sweep
from eval.captions import load_captions, parse_captions
from eval.images import read_rgb

REPO = Path(__file__).resolve().parents[1]
SETTINGS = sweep.GenerationSettings(model="tiny-random", dtype="fp32", steps=2, height=64, width=64)
CAPTIONS = load_captions()[:6]


@pytest.fixture(scope="module")
def pipe():
    return sweep.load_sweep_pipeline(SETTINGS, torch.device("cpu"))


def _plan(out: Path, methods=("cfg",), scales=(3.0,), seeds=(0,), captions=CAPTIONS, batch_size=1, **settings):
    return sweep.SweepPlan(
        out=out,
        methods=tuple(sweep.get_method(m) for m in methods),
        scales=scales,
        seeds=seeds,
        captions=captions,
        source=sweep.CaptionSource("test", "-", None, None),
        settings=dataclasses.replace(SETTINGS, **settings),
        batch_size=batch_size,
    )


def _run(plan, pipe, shard=None):
    sweep.prepare_output(plan, torch.device("cpu"), write=True)
    return sweep.run_sweep(plan, pipe, shard or sweep.Shard())


def _pngs(out: Path) -> dict[str, Path]:
    return {str(p.relative_to(out)): p for p in sorted(out.rglob("*.png"))}


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(read_rgb(path))


def test_method_table_maps_names_to_pipeline_kwargs():
    assert sweep.get_method("cfg").pipeline_kwargs() == {"segmentor": None, "scfg_config": None, "goca_config": None}
    assert sweep.get_method("scfg").pipeline_kwargs()["segmentor"] == "scfg"
    goca, vanilla = sweep.get_method("goca"), sweep.get_method("goca-vanilla")
    assert goca.segmentor == vanilla.segmentor == "goca"
    assert goca.goca_config == sweep.GoCAConfig() and vanilla.goca_config == sweep.GoCAConfig.vanilla()
    assert len({m.name for m in sweep.METHODS}) == len(sweep.METHODS)
    with pytest.raises(ValueError, match="unknown method 'pag'"):
        sweep.get_method("pag")


def test_kill_mid_sweep_then_resume_completes_without_regenerating(tmp_path, capsys):
    out = tmp_path / "x"
    args = ["--model", "tiny-random", "--methods", "cfg,scfg", "--scales", "3,7.5", "--seeds", "0,1", "--limit", "6"]
    args += ["--steps", "2", "--height", "64", "--width", "64", "--dtype", "fp32", "--batch-size", "1"]
    args += ["--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "eval.sweep", *args], cwd=REPO, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(_pngs(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no cleanup handler runs
    stderr = proc.communicate()[1].decode()
    before = _pngs(out)
    assert 3 <= len(before) < 48, stderr[-2000:]
    for path in before.values():  # every PNG that exists after the kill is complete
        assert read_rgb(path).size == (64, 64)
    stamps = {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in before.items()}
    # what a kill during a write leaves behind: a hidden temporary next to an unfinished image
    unfinished = next(c for c in CAPTIONS if f"scfg/cfg-7.5/seed-1/{c.image_id}.png" not in before)
    partial = out / f"scfg/cfg-7.5/seed-1/.{unfinished.image_id}.png.otherhost-99-deadbeef.tmp"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"\x89PNG half")

    assert sweep.main(args) == 0
    assert f"generated {48 - len(before)}, skipped {len(before)} finished" in capsys.readouterr().out
    after = _pngs(out)
    expected = {
        f"{m}/cfg-{w}/seed-{s}/{c.image_id}.png"
        for m in ("cfg", "scfg")
        for w in (3.0, 7.5)
        for s in (0, 1)
        for c in CAPTIONS
    }
    assert set(after) == expected
    assert {n: (p.stat().st_ino, p.stat().st_mtime_ns) for n, p in after.items() if n in before} == stamps
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert sorted(p.name for p in out.iterdir()) == ["captions.csv", "cfg", "manifest.json", "scfg"]

    manifest = io.read_json(out / "manifest.json")
    assert manifest["generation"] == {
        "model": "tiny-random",
        "dtype": "fp32",
        "scheduler": "default",
        "steps": 2,
        "height": 64,
        "width": 64,
        "seed_mode": "same",
        "generator_device": "device",
    }
    assert [c["path"] for c in manifest["cells"]] == [
        f"{m}/cfg-{w}/seed-{s}" for m in ("cfg", "scfg") for w in (3.0, 7.5) for s in (0, 1)
    ]
    assert manifest["methods"]["cfg"]["segmentor"] is None and manifest["methods"]["scfg"]["segmentor"] == "scfg"
    assert (
        manifest["captions"]["count"] == 6 and manifest["captions"]["source_md5"] == "b436ece32e1b9247eaeb9ad0e7e1e21d"
    )
    assert manifest["versions"]["torch"] and manifest["versions"]["diffusers"] and manifest["command"]
    assert parse_captions((out / "captions.csv").read_text(encoding="utf-8")) == CAPTIONS
    assert io.file_md5(out / "captions.csv") == manifest["captions"]["md5"]


def test_two_shards_make_exactly_the_unsharded_set(tmp_path, pipe):
    full = _run(_plan(tmp_path / "full", scales=(3.0, 7.5)), pipe)
    assert full == sweep.SweepResult(generated=12, skipped=0)
    sharded = _plan(tmp_path / "sharded", scales=(3.0, 7.5))
    parts = [_run(sharded, pipe, sweep.Shard(i, 2)) for i in range(2)]
    assert sum(p.generated for p in parts) == 12
    a, b = _pngs(tmp_path / "full"), _pngs(tmp_path / "sharded")
    assert set(a) == set(b) and len(a) == 12
    for name in a:  # same seeds ⇒ identical images, whichever process made them
        np.testing.assert_array_equal(_pixels(a[name]), _pixels(b[name]))
    assert _run(sharded, pipe, sweep.Shard(1, 2)) == sweep.SweepResult(generated=0, skipped=6)


def test_distributed_launch_splits_the_work_between_processes(tmp_path, pipe):
    """`torchrun` sets the environment that `accelerate launch --multi_gpu` sets; two CPU processes share one run."""
    args = [
        "--model",
        "tiny-random",
        "--methods",
        "cfg",
        "--scales",
        "3",
        "--seeds",
        "0",
        "--limit",
        "3",
        "--steps",
        "2",
    ]
    args += ["--height", "64", "--width", "64", "--dtype", "fp32", "--batch-size", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launcher, "-m", "eval.sweep", *args, "--out", str(tmp_path / "dist")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "shard 0/2: generated 2" in done.stdout and "shard 1/2: generated 1" in done.stdout
    _run(_plan(tmp_path / "single", captions=CAPTIONS[:3]), pipe)
    a, b = _pngs(tmp_path / "single"), _pngs(tmp_path / "dist")
    assert set(a) == set(b) and len(a) == 3
    for name in a:
        np.testing.assert_array_equal(_pixels(a[name]), _pixels(b[name]))


def test_shards_partition_the_captions_also_within_accelerate_processes():
    captions = tuple(range(23))
    for count in (1, 2, 3):
        for processes in (1, 2, 4):
            parts = [
                sweep.Shard(i, count).split(processes, p).select(captions)
                for i in range(count)
                for p in range(processes)
            ]
            assert sorted(x for part in parts for x in part) == list(captions)
    assert sweep.Shard.parse("1/4") == sweep.Shard(1, 4)
    for bad in ("4/4", "1-4", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            sweep.Shard.parse(bad)


@pytest.mark.parametrize("mode", ["same", "per-image"])
def test_seed_modes(tmp_path, pipe, mode):
    twins = (CAPTIONS[0], dataclasses.replace(CAPTIONS[0], image_id=1))  # one caption under two image ids
    _run(_plan(tmp_path / mode, captions=twins, seed_mode=mode), pipe)
    a, b = (_pixels(tmp_path / mode / "cfg/cfg-3.0/seed-0" / f"{c.image_id}.png") for c in twins)
    # "same": the paper's protocol, one initial noise for every caption; "per-image": noise from (seed, image_id)
    assert np.array_equal(a, b) == (mode == "same")


def test_image_seeds():
    assert sweep.image_seed(42, 7, "same") == sweep.image_seed(42, 8, "same") == 42
    per_image = {sweep.image_seed(42, i, "per-image") for i in range(100)}
    assert len(per_image) == 100 and all(0 <= s < 2**63 for s in per_image)
    assert (
        sweep.image_seed(42, 7, "per-image")
        == sweep.image_seed(42, 7, "per-image")
        != sweep.image_seed(43, 7, "per-image")
    )


def test_batches_equal_single_runs_up_to_rounding(tmp_path, pipe):
    _run(_plan(tmp_path / "b1", methods=("scfg",), captions=CAPTIONS[:3]), pipe)
    _run(_plan(tmp_path / "b3", methods=("scfg",), captions=CAPTIONS[:3], batch_size=3), pipe)
    for name, path in _pngs(tmp_path / "b1").items():
        diff = np.abs(_pixels(path).astype(int) - _pixels(tmp_path / "b3" / name).astype(int))
        assert diff.max() <= 1  # batched CPU matmuls sum in another order (~1e-6), which can flip one 8-bit level


def test_a_changed_setting_is_refused_and_new_cells_extend_the_run(tmp_path, pipe):
    captions = CAPTIONS[:2]
    _run(_plan(tmp_path / "r", captions=captions), pipe)
    with pytest.raises(ValueError, match="different 'generation'"):
        _run(_plan(tmp_path / "r", captions=captions, steps=3), pipe)
    with pytest.raises(ValueError, match="different 'captions'"):
        _run(_plan(tmp_path / "r", captions=CAPTIONS[:3]), pipe)
    result = _run(_plan(tmp_path / "r", captions=captions, scales=(3.0, 5.0)), pipe)
    assert result == sweep.SweepResult(generated=2, skipped=2)
    manifest = io.read_json(tmp_path / "r" / "manifest.json")
    assert [c["path"] for c in manifest["cells"]] == ["cfg/cfg-3.0/seed-0", "cfg/cfg-5.0/seed-0"]
    assert manifest["scales"] == [3.0, 5.0]


def test_presets_and_settings_validation(caplog):
    paper = sweep.PRESETS["paper"]
    assert paper.settings.model == sweep.SD15_MODEL_ID and paper.settings.dtype == "fp16"
    assert (paper.settings.steps, paper.settings.scheduler, paper.settings.seed_mode) == (50, "default", "same")
    assert paper.scales == (2.0, 3.0, 5.0, 7.5, 10.0)
    assert sweep.PRESETS["per-image"].settings.seed_mode == "per-image"
    assert sweep.resolve_dtype("fp16", torch.device("cpu")) == "fp32" and "fp32" in caplog.text
    assert sweep.resolve_dtype("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(ValueError, match="multiple of 8"):
        sweep.GenerationSettings(height=60)
    with pytest.raises(ValueError, match="scheduler"):
        sweep.GenerationSettings(scheduler="euler")
    with pytest.raises(ValueError, match="duplicate scales"):
        _plan(Path("x"), scales=(3.0, 3.0))


def test_scheduler_option_keeps_the_model_noise_schedule(pipe):
    copy = sweep.load_sweep_pipeline(dataclasses.replace(SETTINGS, scheduler="dpm++"), torch.device("cpu"))
    assert type(copy.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert copy.scheduler.config.algorithm_type == "dpmsolver++" and copy.scheduler.config.solver_order == 2
    assert copy.scheduler.config.beta_end == pipe.scheduler.config.beta_end == 0.012
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"


def test_generated_images_are_pngs_of_the_requested_size(tmp_path, pipe):
    _run(_plan(tmp_path / "s", captions=CAPTIONS[:1]), pipe)
    (path,) = _pngs(tmp_path / "s").values()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (64, 64)


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert sweep.main(["--out", str(tmp_path), "--model", "tiny-random", "--methods", "cfg,pag"]) == 2
    assert "error: unknown method 'pag'" in capsys.readouterr().err
    assert sweep.main(["--out", str(tmp_path), "--limit", "3", "--subset-seed", "1", "--captions", "none.csv"]) == 2
    assert "caption file not found: none.csv" in capsys.readouterr().err
