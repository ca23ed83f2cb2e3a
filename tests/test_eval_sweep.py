"""Sweep (eval/sweep.py) with the tiny pipeline: expected files and manifest, a real kill then resume, shards that
add up to the unsharded set, seeds, and manifest consistency."""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import shutil
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
from goca_scfg.vocab import METHOD_NAMES

pytestmark = pytest.mark.rounding  # compares runs: .ci/run's portability job runs it again

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
    switches = [(c.head, c.layer, c.rescale) for c in (goca.goca_config, vanilla.goca_config)]
    assert switches == [("dot", "similarity", "sum1"), ("average", "average", "none")]  # Table 2: all on / all off
    assert len(set(METHOD_NAMES)) == len(METHOD_NAMES)
    with pytest.raises(ValueError, match="unknown method 'pag'"):
        sweep.get_method("pag")


# The sweep's byte-reproducibility across processes holds for one machine and one thread count: the child processes
# run with this process's (conftest: 1, or GOCA_TEST_THREADS), so the reference images are made the same way.
_THREADS = str(torch.get_num_threads())
ENV = {**os.environ, "OMP_NUM_THREADS": _THREADS, "MKL_NUM_THREADS": _THREADS, "HF_HUB_OFFLINE": "1"}
METHODS = ("cfg", "scfg", "goca")


def _cli(out: Path, methods=METHODS, limit=6, batch_size=2) -> list[str]:
    args = ["--model", "tiny-random", "--methods", ",".join(methods), "--scales", "3", "--seeds", "0"]
    args += ["--limit", str(limit), "--steps", "2", "--height", "64", "--width", "64", "--dtype", "fp32"]
    return args + ["--batch-size", str(batch_size), "--out", str(out), "--no-progress"]


def _contents(out: Path) -> dict[str, bytes]:
    return {name: path.read_bytes() for name, path in _pngs(out).items()}


def _guidance(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): p.read_text() for p in sorted((out / "guidance").rglob("seed-*.csv"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pipe) -> Path:
    """One uninterrupted in-process run: cfg, scfg and goca × 6 captions in groups of 2."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = _run(_plan(out, methods=METHODS, batch_size=2), pipe)
    assert result == sweep.SweepResult(generated=18, skipped=0)
    return out


def test_two_shards_give_byte_identical_pngs(reference, tmp_path, pipe):
    sharded = _plan(tmp_path / "sharded", methods=METHODS, batch_size=2)
    parts = [_run(sharded, pipe, sweep.Shard(i, 2)) for i in range(2)]
    assert [p.generated for p in parts] == [12, 6]  # groups 0, 2 | group 1, of every cell
    assert _contents(tmp_path / "sharded") == _contents(reference)
    assert _guidance(tmp_path / "sharded") == _guidance(reference)
    assert _run(sharded, pipe, sweep.Shard(1, 2)) == sweep.SweepResult(generated=0, skipped=6)


@pytest.mark.slow
def test_two_processes_give_byte_identical_pngs(reference, tmp_path):
    """`torchrun` sets the environment that `accelerate launch --multi_gpu` sets; two CPU processes share one run."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launcher, "-m", "eval.sweep", *_cli(tmp_path / "dist")],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "shard 0/2: generated 12" in done.stdout and "shard 1/2: generated 6" in done.stdout
    assert _contents(tmp_path / "dist") == _contents(reference)


@pytest.mark.slow
def test_sigkill_then_resume_gives_byte_identical_pngs(reference, tmp_path, capsys):
    out = tmp_path / "x"
    proc = subprocess.Popen(
        [sys.executable, "-m", "eval.sweep", *_cli(out)], cwd=REPO, env=ENV, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while len(_pngs(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()  # SIGKILL: no cleanup handler runs
    stderr = proc.communicate()[1].decode()
    before = _pngs(out)
    assert 3 <= len(before) < 18, stderr[-2000:]
    for path in before.values():  # every PNG that exists after the kill is complete
        assert read_rgb(path).size == (64, 64)
    stamps = {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in before.items()}
    # what a kill during a write leaves behind: a hidden temporary next to an unfinished image
    unfinished = next(c for c in CAPTIONS if f"goca/cfg-3.0/seed-0/{c.image_id}.png" not in before)
    partial = out / f"goca/cfg-3.0/seed-0/.{unfinished.image_id}.png.otherhost-99-deadbeef.tmp"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"\x89PNG half")

    assert sweep.main(_cli(out)) == 0
    assert f"generated {18 - len(before)}, skipped {len(before)} finished" in capsys.readouterr().out
    assert _contents(out) == _contents(reference)
    assert _guidance(out) == _guidance(reference)
    assert {n: (p.stat().st_ino, p.stat().st_mtime_ns) for n, p in _pngs(out).items() if n in before} == stamps
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.is_file() and ".claims" in p.parts]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".claims", "captions.csv", *METHODS, "guidance", "manifest.json"]
    )

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
    assert manifest["batch_size"] == 2 and manifest["format"] == 2
    assert [c["path"] for c in manifest["cells"]] == [f"{m}/cfg-3.0/seed-0" for m in METHODS]
    assert manifest["methods"]["cfg"]["segmentor"] is None and manifest["methods"]["scfg"]["segmentor"] == "scfg"
    assert (
        manifest["captions"]["count"] == 6 and manifest["captions"]["source_md5"] == "b436ece32e1b9247eaeb9ad0e7e1e21d"
    )
    assert manifest["versions"]["torch"] and manifest["versions"]["diffusers"] and manifest["command"]
    assert parse_captions((out / "captions.csv").read_text(encoding="utf-8")) == CAPTIONS
    assert io.file_md5(out / "captions.csv") == manifest["captions"]["md5"]


@pytest.mark.slow
def test_two_sweeps_at_once_generate_every_image_exactly_once(reference, tmp_path):
    out = tmp_path / "both"
    command = [sys.executable, "-m", "eval.sweep", *_cli(out)]
    procs = [
        subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in "ab"
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    generated = [int(re.search(rb"generated (\d+)", stdout).group(1)) for stdout, _ in outputs]
    assert sum(generated) == 18, generated
    assert _contents(out) == _contents(reference)


def test_damaged_and_foreign_images_are_regenerated(reference, tmp_path, pipe, caplog):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    cell = out / "scfg/cfg-3.0/seed-0"
    names = [f"{c.image_id}.png" for c in CAPTIONS]
    data = (cell / names[0]).read_bytes()
    (cell / names[0]).write_bytes(data[: len(data) // 2])  # truncated
    (cell / names[3]).write_bytes(b"")  # zero bytes
    Image.new("L", (64, 64)).save(cell / names[4])  # grayscale
    shutil.copy(out / "cfg/cfg-3.0/seed-0" / names[5], cell / names[5])  # another cell's image: other settings
    with caplog.at_level("WARNING"):
        result = _run(_plan(out, methods=METHODS, batch_size=2), pipe)
    assert result == sweep.SweepResult(generated=4, skipped=14, replaced=4)
    assert f"{names[0]} (truncated)" in caplog.text and f"{names[3]} (empty file)" in caplog.text
    assert f"{names[4]} (L 64x64, expected RGB 64x64)" in caplog.text and "written with other settings" in caplog.text
    assert _contents(out) == _contents(reference)


def test_resume_with_another_batch_size_is_refused(reference, tmp_path, capsys):
    shutil.copytree(reference, tmp_path / "r")
    assert sweep.main(_cli(tmp_path / "r", batch_size=3)) == 2
    err = capsys.readouterr().err
    assert "generated with --batch-size 2" in err and "Pass --batch-size 2" in err and len(err.splitlines()) == 1


def test_effective_guidance_is_logged_per_image(reference, pipe):
    rows = {}
    for method in METHODS:
        with open(sweep.guidance_path(reference, f"{method}/cfg-3.0/seed-0"), newline="") as f:
            rows[method] = list(csv.DictReader(f))
        assert [int(r["image_id"]) for r in rows[method]] == [c.image_id for c in CAPTIONS]
    for r in rows["cfg"]:  # plain CFG: r = 1 everywhere, the effective scale is exactly w
        assert float(r["effective_scale"]) == 3.0 and r["rate_per_step"] == "1.0 1.0 1.0"  # PNDM: 2 steps, 3 calls
    group = CAPTIONS[2:4]  # group 1: recompute it with the maps and compare
    for method in ("scfg", "goca"):
        out = pipe(
            prompt=[c.text for c in group],
            height=64,
            width=64,
            num_inference_steps=2,
            guidance_scale=3.0,
            generator=[torch.Generator().manual_seed(0) for _ in group],
            return_maps=True,
            **sweep.get_method(method).pipeline_kwargs(),
        )
        for i, row in enumerate(rows[method][2:4]):
            means = [float(m.rate[i].double().mean()) for m in out.maps]
            assert float(row["effective_scale"]) == pytest.approx(3.0 * np.mean(means), rel=1e-6, abs=0)
            assert [float(v) for v in row["rate_per_step"].split()] == pytest.approx(means, rel=1e-6)
        spread = {row["effective_scale"] for row in rows[method]}
        assert len(spread) > 1  # S-CFG rescales per pixel: the effective scale is not simply w


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
    # pinned: a manifest's per-image seeds must mean the same noise in every later version
    assert sweep.image_seed(42, 7, "per-image") == 4689037808163114589 != sweep.image_seed(43, 7, "per-image")


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


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--scales=nan", "error: guidance scales must be finite and > 0, got [nan]"),
        ("--scales=-2", "error: guidance scales must be finite and > 0, got [-2.0]"),
        ("--scales=0,3", "error: guidance scales must be finite and > 0, got [0.0]"),
        ("--scales=,", "',' has an empty item"),
        ("--methods=cfg,,goca", "'cfg,,goca' has an empty item"),
        ("--seeds=0,", "'0,' has an empty item"),
    ],
)
def test_bad_lists_are_refused_before_any_work(tmp_path, capsys, option, message):
    argv = ["--out", str(tmp_path / "never"), "--model", "tiny-random", option]
    try:
        code = sweep.main(argv)
    except SystemExit as exit:  # argparse rejects malformed lists itself
        code = exit.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--methods", "goca", "--height", "40"], "error: --height/--width 40x64 with --methods goca: segmentation "),
        (
            ["--model", "tiny-random-pixart", "--methods", "scfg"],
            "error: --methods scfg: segmentor='scfg' is defined ",
        ),
        (["--preset", "sdxl", "--model", "tiny-random-pixart", "--methods", "goca"], "error: --preset sdxl is the "),
    ],
    ids=["goca-height-40", "pixart-scfg", "preset-sdxl-on-pixart"],
)
def test_a_sweep_the_pipeline_would_refuse_writes_nothing(tmp_path, capsys, options, message):
    """Refused after the model loads, before the first write: no manifest.json or captions.csv is left behind, so
    the corrected command is not refused for that --out."""
    argv = ["--model", "tiny-random", "--scales", "3", "--seeds", "0", "--limit", "2", "--steps", "2"]
    argv += ["--height", "64", "--width", "64", "--dtype", "fp32", "--out", str(tmp_path / "out"), "--no-progress"]
    assert sweep.main([*argv, *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "out").exists()


def test_a_group_claimed_by_a_live_process_is_named_with_the_wait(tmp_path, pipe, caplog):
    plan = _plan(tmp_path / "c", captions=CAPTIONS[:1])
    sweep.prepare_output(plan, torch.device("cpu"), write=True)
    claim = tmp_path / "c" / ".claims" / "cfg/cfg-3.0/seed-0" / "group-000000"
    claim.parent.mkdir(parents=True)
    holder = os.getppid()  # alive for the whole test
    claim.write_text(f'{{"host": "{io.socket.gethostname()}", "pid": {holder}, "time": {time.time()}}}')
    start = time.monotonic()
    with caplog.at_level("INFO"):
        result = sweep.run_sweep(plan, pipe, claim_timeout=1.0, poll=0.05)
    assert result.generated == 1 and time.monotonic() - start >= 0.9  # waited, then took the claim over
    assert f"cfg/cfg-3.0/seed-0 group 0 is being generated by pid {holder} on" in caplog.text
    assert str(claim) in caplog.text and "at most 1 s more (--claim-timeout 1)" in caplog.text


def test_the_guidance_scale_goes_to_the_keyword_of_the_models_family():
    """Flux's S-CFG scale is `true_cfg_scale`, which needs a negative prompt; a sweep that passed `guidance_scale`
    (Flux's embedded guidance) ran no CFG at all."""
    work = sweep.GroupWork(sweep.get_method("goca"), 3.0, 0, 0, CAPTIONS[:2])
    flux, sd = type("FluxPipeline", (), {})(), type("StableDiffusionPipeline", (), {})()
    assert sweep._guidance_kwargs(flux, work) == {"true_cfg_scale": 3.0, "negative_prompt": ["", ""]}
    assert sweep._guidance_kwargs(sd, work) == {"guidance_scale": 3.0}
