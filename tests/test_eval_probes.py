"""Bad input to the evaluation CLIs (sweep, metrics, report), as users slip: each probe ends in one line `error: …`
with exit status 2 naming the option or file, before any model loads and without writing anything, or in the
correct behaviour. The probes that need a pipeline run are in test_eval_sweep.py; docs/bad_input.md lists them all."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval import io, metrics, report, sweep
from eval.captions import Caption
from eval.fid import FIDProtocol, feature_statistics, save_stats
from eval.metric_fid import FID

CAPTIONS = (Caption(11, "a red car"), Caption(22, "a dog"), Caption(33, "a cake"))
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="probes a machine without CUDA")


def _png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)


def _plan(out: Path, captions=CAPTIONS, batch_size: int = 4) -> sweep.SweepPlan:
    return sweep.SweepPlan(
        out=out,
        methods=(sweep.get_method("cfg"),),
        scales=(3.0,),
        seeds=(0,),
        captions=captions,
        source=sweep.CaptionSource("inline", "-", None, None),
        settings=sweep.GenerationSettings(model="tiny-random", dtype="fp32", steps=2, height=64, width=64),
        batch_size=batch_size,
    )


def _make_run(out: Path, cells: int = 1) -> Path:
    """A finished run without a pipeline: the sweep's own manifest, random PNGs in every cell."""
    plan = _plan(out)
    if cells == 2:
        plan = dataclasses.replace(plan, seeds=(0, 1))
    sweep.prepare_output(plan, torch.device("cpu"), write=True)
    for i, cell in enumerate(io.read_json(out / "manifest.json")["cells"]):
        for c in CAPTIONS:
            _png(out / cell["path"] / f"{c.image_id}.png", 10 * i + c.image_id)
    return out


@pytest.fixture
def run(tmp_path) -> Path:
    return _make_run(tmp_path / "run")


@pytest.fixture
def stats(tmp_path) -> Path:
    """Statistics of the default `clean` protocol, with features (FID and KID)."""
    protocol = FIDProtocol("clean")
    features = np.random.default_rng(0).normal(size=(8, 3))
    path = tmp_path / "ref.npz"
    save_stats(feature_statistics(features, protocol.tag, protocol.network, keep=True), path)
    return path


@pytest.fixture
def no_models(monkeypatch):
    """Any model load fails the test: the probes must be refused before."""
    from eval import clip_score, fid

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(fid, "load_inception", refuse)
    monkeypatch.setattr(clip_score, "load_clip", refuse)
    monkeypatch.setattr(sweep, "load_sweep_pipeline", refuse)


def _exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's own refusals
        return exit.code


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ---------------------------------------------------------------- sweep: refused before the pipeline loads


SWEEP = ["--model", "tiny-random", "--methods", "cfg", "--scales", "3", "--seeds", "0", "--limit", "2", "--steps", "2"]
SWEEP += ["--height", "64", "--width", "64", "--dtype", "fp32", "--no-progress"]


def _captions_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "my.csv"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--seeds", "18446744073709551616"], "argument --seeds: seed 18446744073709551616 is outside 0 … 2**64 - 1"),
        (["--seeds=-1"], "argument --seeds: seed -1 is outside"),
        (["--seeds", "1.5"], "argument --seeds: '1.5' is not a comma-separated list of whole numbers"),
        (["--claim-timeout", "-5"], "argument --claim-timeout: invalid value '-5': must be a finite number"),
        (["--claim-timeout", "nan"], "argument --claim-timeout: invalid value 'nan'"),
        (["--claim-timeout", "inf"], "argument --claim-timeout: invalid value 'inf'"),
        pytest.param(["--device", "cuda"], "--device cuda: CUDA is not available on this machine", marks=NO_CUDA),
        (["--device", "gpu"], "--device gpu: not a torch device name"),
        (["--limit", "0"], "argument --limit: invalid value '0': must be >= 1"),
        (["--limit", "30001"], "--limit 30001 exceeds the 30000 captions"),
        (["--subset-seed", "3", "DROP-LIMIT"], "--subset-seed needs --limit"),
        (["--batch-size", "0"], "argument --batch-size: invalid value '0'"),
        (["--width", "100"], "width=100 must be a positive multiple of 8"),
        (["--height", "100000"], "argument --height: invalid value '100000': must be >= 8 and <= 4096"),
        (["--steps", "0"], "argument --steps: invalid value '0'"),
        (["--steps", "1000000000000"], "argument --steps: invalid value '1000000000000'"),
        (["--methods", "goca,goca"], "duplicate methods"),
        (["--methods", "pag"], "unknown method 'pag'"),
        (["--scales", "3,3"], "duplicate scales"),
        (["--shard", "2/2"], "argument --shard"),
        (["--captions", "header"], "expected the header image_id,text"),
        (["--captions", "twice"], "image_id 7 appears twice"),
        (["--captions", "empty"], "expected the header image_id,text, got None"),
        (["--captions", "nofile"], "caption file not found"),
        (["--out", "file"], "is a file; give a folder"),
    ],
    ids=[
        "seeds-2**64",
        "seeds-negative",
        "seeds-float",
        "claim-timeout-negative",
        "claim-timeout-nan",
        "claim-timeout-inf",
        "device-cuda",
        "device-gpu",
        "limit-0",
        "limit-too-large",
        "subset-seed-without-limit",
        "batch-size-0",
        "width-100",
        "height-100000",
        "steps-0",
        "steps-1e12",
        "methods-twice",
        "methods-unknown",
        "scales-twice",
        "shard-2/2",
        "captions-wrong-header",
        "captions-duplicate-id",
        "captions-empty",
        "captions-missing",
        "out-is-a-file",
    ],
)
def test_sweep_refuses_before_loading_and_writes_nothing(tmp_path, capsys, no_models, options, message):
    out = tmp_path / "never"
    options = list(options)
    if "--captions" in options:
        text = {"header": "id,caption\n7,a cat\n", "twice": "image_id,text\n7,a\n7,b\n", "empty": ""}
        kind = options[1]
        options[1] = _captions_file(tmp_path, text[kind]) if kind in text else str(tmp_path / "none.csv")
    if options == ["--out", "file"]:
        out.write_text("not a folder")
        options = []
    base = list(SWEEP)
    if "DROP-LIMIT" in options:
        options.remove("DROP-LIMIT")
        del base[base.index("--limit") : base.index("--limit") + 2]
    argv = [*base, "--out", str(out), *options]
    assert _exit_code(sweep.main, argv) == 2
    assert message in _one_error_line(capsys)
    assert not out.is_dir()


def _edit(path: Path, change) -> None:
    path.write_text(change(path.read_text(encoding="utf-8")), encoding="utf-8")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("captions", "captions.csv was changed after the run (md5"),
        ("manifest-empty", "manifest.json lacks 'generation'"),
        ("manifest-truncated", "manifest.json is not valid JSON"),
        ("manifest-list", "manifest.json holds a list"),
        ("other-captions", "was generated for other captions"),
        ("batch-size", "generated with --batch-size 2"),
    ],
    ids=["captions-edited", "manifest-empty", "manifest-truncated", "manifest-list", "other-captions", "batch-size"],
)
def test_a_resume_of_a_damaged_or_other_run_is_refused_before_loading(tmp_path, capsys, no_models, damage, message):
    out = tmp_path / "r"
    limit = ["--limit", "2"]
    plan = _plan(out, captions=sweep.load_captions()[:2], batch_size=2)
    sweep.prepare_output(plan, torch.device("cpu"), write=True)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    if damage == "captions":
        _edit(out / "captions.csv", lambda t: t.replace("A", "a", 1))
    elif damage.startswith("manifest"):
        text = {"manifest-empty": "{}", "manifest-truncated": '{"format": 2, "gen', "manifest-list": "[]"}[damage]
        (out / "manifest.json").write_text(text)
    elif damage == "other-captions":
        limit = ["--limit", "3"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    argv = [*SWEEP, "--out", str(out), "--batch-size", "3" if damage == "batch-size" else "2", *limit]
    assert _exit_code(sweep.main, argv) == 2
    assert message in _one_error_line(capsys)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_deleted_caption_file_is_written_again_on_resume(tmp_path):
    plan = _plan(tmp_path / "r")
    sweep.prepare_output(plan, torch.device("cpu"), write=True)
    md5 = io.file_md5(tmp_path / "r" / "captions.csv")
    (tmp_path / "r" / "captions.csv").unlink()
    sweep.check_existing_run(plan)
    sweep.prepare_output(plan, torch.device("cpu"), write=True)
    assert io.file_md5(tmp_path / "r" / "captions.csv") == md5


def test_a_claim_of_a_dead_process_is_taken_over_at_once(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    claim = tmp_path / ".claims" / "group-000000"
    claim.parent.mkdir()
    claim.write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "time": time.time()}))
    assert io.try_claim(claim, timeout=1800.0)
    assert io.claim_holder(claim).pid == os.getpid()
    live = tmp_path / "live"
    live.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "time": time.time() - 5}))
    assert not io.try_claim(live, timeout=1800.0)
    holder = io.claim_holder(live)
    assert holder.pid == os.getppid() and 4 < holder.age < 60


def test_sweep_checks_of_cell_files(tmp_path):
    """A JPEG renamed .png is unfinished (regenerated); a folder where an image belongs is an error naming it."""
    plan = _plan(tmp_path / "r")
    work = sweep.GroupWork(plan.methods[0], 3.0, 0, 0, CAPTIONS)
    folder = tmp_path / "r" / work.cell
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(folder / "11.png", format="JPEG")
    (folder / "22.png").mkdir()
    with pytest.raises(ValueError, match=r"22\.png is a folder, where the sweep writes an image"):
        sweep.group_problems(plan, work, "tag")
    (folder / "22.png").rmdir()
    problems = sweep.group_problems(plan, work, "tag")
    assert problems[CAPTIONS[0]] == sweep.Unfinished("damaged", "not a PNG") and problems[CAPTIONS[0]].rewrite_image
    assert problems[CAPTIONS[1]].kind == "missing"


# ---------------------------------------------------------------- metrics: refused before any model loads


def _ref_file(tmp_path: Path, kind: str, stats: Path) -> str:
    path = tmp_path / f"{kind}.npz"
    if kind == "truncated":
        path.write_bytes(stats.read_bytes()[:200])
    elif kind == "text":
        path.write_text("mu sigma\n1 2\n")
    elif kind == "nan-sigma":
        np.savez(path, mu=np.zeros(3), sigma=np.full((3, 3), np.nan))
    elif kind == "npy":
        np.save(path, np.zeros(3))
        path = path.with_suffix(".npz.npy")
    elif kind == "bad-shape":
        np.savez(path, mu=np.zeros(3), sigma=np.eye(4))
    elif kind == "t2ib":
        protocol = FIDProtocol("t2ib")
        save_stats(feature_statistics(np.eye(4)[:, :3], protocol.tag, protocol.network), path)
    elif kind == "folder":
        path = tmp_path / "a-folder"
        path.mkdir()
    return str(path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--ref-stats", "truncated"], "truncated.npz is damaged or truncated (BadZipFile"),
        (["--ref-stats", "text"], "text.npz is not an .npz file"),
        (["--ref-stats", "nan-sigma", "--ref-stats-foreign"], "nan-sigma.npz: sigma holds NaN or inf values"),
        (["--ref-stats", "npy"], "is not an .npz file"),
        (["--ref-stats", "bad-shape", "--ref-stats-foreign"], "need mu (D,) and sigma (D, D)"),
        (["--ref-stats", "t2ib"], "was computed with t2ib-ccrop-299/inception-pytorch-fid, but this command scores"),
        (["--ref-stats", "folder"], "reference statistics not found"),
        (["--ref-stats", "ok", "--preset", "paper", "--mode", "clean"], "--preset paper scores with --mode t2ib"),
        (["--ref-stats", "ok", "--inception", "nowhere.pt"], "--inception nowhere.pt: not found"),
        (["--no-fid", "--no-clip"], "nothing to compute"),
        (
            ["--ref-stats", "ok", "--clip-model", "ViT-X-99"],
            "--clip-model/--clip-pretrained/--clip-weights: open_clip",
        ),
        (["--ref-stats", "ok", "--clip-pretrained", "nope"], "open_clip has no tag 'nope' for ViT-B-32"),
        (["--ref-stats", "ok", "--clip-weights", "nowhere.pt"], "CLIP weights file not found: nowhere.pt"),
        (["--cmmd-ref", "nowhere"], "--cmmd-ref nowhere: no such folder or file"),
        (["--cmmd-ref", "few"], "1 of 3 caption ids have no image, e.g. [33] (or pass --cmmd-ref-all"),
        (["--cmmd-ref", "one", "--cmmd-ref-all"], "holds 1 images; CMMD needs at least 2"),
        (["--cmmd-ref", "text"], "text.npz is not an .npz file"),
        (["--cmmd-ref", "ok"], "ref.npz is damaged or not a CMMD reference file (KeyError"),
        (["--cmmd-ref", "few", "--cmmd-ref-all", "--cmmd-model", "RN-nope"], "--cmmd-model/--cmmd-pretrained"),
        (["--cmmd-ref", "few", "--cmmd-ref-all", "--cmmd-cache", "file"], "--cmmd-cache file is a file"),
        (["--ref-stats", "ok", "--batch-size", "0"], "argument --batch-size: invalid value '0'"),
        (["--ref-stats", "ok", "--workers", "-1"], "argument --workers: invalid value '-1'"),
        (["--ref-stats", "ok", "--claim-timeout", "nan"], "argument --claim-timeout: invalid value 'nan'"),
        pytest.param(["--ref-stats", "ok", "--device", "cuda"], "--device cuda: CUDA is not available", marks=NO_CUDA),
        (["--ref-stats", "ok", "--device", "tpu:0"], "--device tpu:0: not a torch device name"),
    ],
    ids=[
        "ref-stats-truncated",
        "ref-stats-text-file",
        "ref-stats-nan-sigma",
        "ref-stats-npy",
        "ref-stats-bad-shape",
        "ref-stats-other-protocol",
        "ref-stats-folder",
        "preset-paper-mode-clean",
        "inception-missing",
        "every-metric-off",
        "clip-model-unknown",
        "clip-pretrained-unknown",
        "clip-weights-missing",
        "cmmd-ref-missing",
        "cmmd-ref-ids-missing",
        "cmmd-ref-one-image",
        "cmmd-ref-text-file",
        "cmmd-ref-fid-stats",
        "cmmd-model-unknown",
        "cmmd-cache-is-a-file",
        "batch-size-0",
        "workers-negative",
        "claim-timeout-nan",
        "device-cuda",
        "device-tpu",
    ],
)
def test_score_refuses_before_loading_a_model(tmp_path, run, stats, capsys, no_models, monkeypatch, options, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    for name in ("few/COCO_val2014_000000000011.jpg", "few/COCO_val2014_000000000022.jpg", "one/11.png"):
        _png(tmp_path / name)
    (tmp_path / "file").write_text("x")
    options = list(options)
    if "--cmmd-ref" in options:
        options = ["--no-fid", "--no-clip", "--cmmd-pretrained", "none", *options]
    for flag in ("--ref-stats", "--cmmd-ref"):
        if flag in options and options[options.index(flag) + 1] in ("truncated", "text", "nan-sigma", "npy",
                                                                     "bad-shape", "t2ib", "folder", "ok"):  # fmt: skip
            i = options.index(flag) + 1
            options[i] = str(stats) if options[i] == "ok" else _ref_file(tmp_path, options[i], stats)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert _exit_code(metrics.main, ["score", "--run", str(run), "--no-download", *options]) == 2
    assert message in _one_error_line(capsys)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no-manifest", "no manifest.json in"),
        ("cell-folder", "no manifest.json in"),
        ("manifest-empty", "manifest.json lacks 'generation'"),
        ("manifest-cells", "cell 0 is not a {method, scale, seed, path} record"),
        ("manifest-escape", "cell path '../elsewhere' leaves the run folder"),
        ("captions-edited", "captions.csv was changed after the run"),
        ("jpeg-as-png", "22.png: JPEG data, not PNG"),
        ("extra-png", "not in the manifest: 99.png"),
        ("grey", "22.png: L 64x64"),
        ("missing", "missing: 33.png"),
        ("uppercase", "not in the manifest: 22.PNG"),
    ],
    ids=[
        "no-manifest",
        "cell-folder",
        "manifest-empty",
        "manifest-cells",
        "manifest-escape",
        "captions-edited",
        "jpeg-as-png",
        "extra-png",
        "grey",
        "missing",
        "uppercase",
    ],
)
def test_score_refuses_a_damaged_run_before_loading_a_model(run, stats, capsys, no_models, damage, message):
    cell = run / "cfg" / "cfg-3.0" / "seed-0"
    target = run
    if damage == "no-manifest":
        (run / "manifest.json").unlink()
    elif damage == "cell-folder":
        target = cell
    elif damage.startswith("manifest"):
        manifest = io.read_json(run / "manifest.json")
        if damage == "manifest-empty":
            manifest = {}
        elif damage == "manifest-cells":
            manifest["cells"] = [{"method": "cfg"}]
        else:
            manifest["cells"][0]["path"] = "../elsewhere"
        (run / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "captions-edited":
        _edit(run / "captions.csv", lambda t: t + "44,one more\r\n")
    elif damage == "jpeg-as-png":
        Image.open(cell / "22.png").convert("RGB").save(cell / "22.png", format="JPEG")
    elif damage == "extra-png":
        _png(cell / "99.png")
    elif damage == "grey":
        Image.new("L", (64, 64)).save(cell / "22.png")
    elif damage == "missing":
        (cell / "33.png").unlink()
    elif damage == "uppercase":
        (cell / "22.png").rename(cell / "22.PNG")
    assert metrics.main(["score", "--run", str(target), "--ref-stats", str(stats)]) == 2
    assert message in _one_error_line(capsys)
    assert not (run / "metrics").exists()


def test_a_leftover_temporary_file_in_a_cell_is_ignored(run, stats):
    cell = run / "cfg" / "cfg-3.0" / "seed-0"
    (cell / ".22.png.otherhost-99-deadbeef.tmp").write_bytes(b"\x89PNG half")
    checked = metrics.check_run(run)
    assert [p.name for p in checked.files[checked.run.cells[0]]] == ["11.png", "22.png", "33.png"]


def _stand_in(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3)) / 255.0


def _fid(stats: Path, extractor=_stand_in) -> FID:
    from eval.fid import load_stats
    from eval.metric_fid import FIDSetup

    return FID(FIDSetup(load_stats(stats), "toy", FIDProtocol("clean"), extractor, "inception-torchscript"))


def test_a_truncated_png_read_by_loader_workers_is_one_line_naming_it(run, stats):
    path = run / "cfg" / "cfg-3.0" / "seed-0" / "22.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header is intact: the cheap check passes, the decode fails
    with pytest.raises(ValueError) as err:
        metrics.score_run(run, [_fid(stats)], batch_size=2, num_workers=2)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"cannot read image {path}")


def test_a_damaged_cell_cache_is_recomputed(run, stats, caplog):
    first = metrics.score_run(run, [_fid(stats)]).scores_csv.read_text()
    (cache,) = (run / "metrics" / "cells").rglob("*.json")
    cache.write_text(cache.read_text()[:40])
    with caplog.at_level("WARNING"):
        assert metrics.score_run(run, [_fid(stats)]).scores_csv.read_text() == first
    assert "ignoring the damaged cache" in caplog.text


def _score_with_a_log(run: str, stats: str, log: str) -> None:
    """One of two concurrent `score` runs (a forked process): stand-in features, each batch logged as computed."""
    torch.set_num_threads(1)

    def slow(x: torch.Tensor) -> torch.Tensor:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {len(x)}\n")
        time.sleep(0.3)
        return _stand_in(x)

    metrics.score_run(run, [_fid(Path(stats), slow)], batch_size=8, poll=0.05)


def test_two_concurrent_score_runs_compute_each_cell_once(tmp_path, stats):
    run = _make_run(tmp_path / "two", cells=2)
    log = tmp_path / "computed.log"
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_score_with_a_log, args=(str(run), str(stats), str(log))) for _ in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    lines = log.read_text().splitlines()
    assert len(lines) == 2, lines  # 2 cells of 3 images, one batch each: computed once in all
    with open(run / "metrics" / "scores.csv", newline="") as f:
        assert all(math.isfinite(float(r["fid"])) for r in csv.DictReader(f))
    assert not [p for p in (run / "metrics" / ".claims").rglob("*") if p.is_file()]  # every claim released


def test_damaged_inception_weights_are_one_line_naming_the_option(tmp_path):
    from eval.fid import load_inception

    for mode, name in (("clean", "inception-2015-12-05.pt"), ("t2ib", "pt_inception-2015-12-05-6726825d.pth")):
        path = tmp_path / name
        path.write_bytes(b"\x00" * 100)
        with pytest.raises(ValueError, match=r"--inception .* the Inception weights do not load") as err:
            load_inception(FIDProtocol(mode), path)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--name", "coco_val"], "statistics name 'coco_val' must be non-empty without"),
        (["--all-images", "--limit", "3"], "--all-images excludes --captions and --limit"),
        (["--all-images", "--images", "empty"], "holds 0 images; reference statistics need at least 2"),
        (["--images", "nowhere"], "image folder not found: nowhere"),
        (["--out", "file"], "--out file is a file"),
    ],
    ids=["name-with-underscore", "all-images-with-limit", "empty-folder", "missing-folder", "out-is-a-file"],
)
def test_ref_stats_refuses_before_loading(tmp_path, capsys, no_models, monkeypatch, options, message):
    monkeypatch.chdir(tmp_path)
    for i in range(3):
        _png(tmp_path / "coco" / f"COCO_val2014_{i:012d}.jpg", i)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    argv = ["ref-stats", "--images", "coco", "--all-images", *options]
    if "--limit" in options or "--name" in options:
        argv.remove("--all-images")
        if "--name" in options:
            argv += ["--captions", _captions_file(tmp_path, "image_id,text\n0,a\n1,b\n")]
    assert _exit_code(metrics.main, argv) == 2
    assert message in _one_error_line(capsys)


# ---------------------------------------------------------------- report


def _scores(path: Path, rows) -> Path:
    path.write_text("method,scale,seed,n_images,fid,clip\n" + "".join(f"{','.join(map(str, r))}\n" for r in rows))
    return path


def _per_image(path: Path, rows, column: str = "clip") -> Path:
    text = f"method,scale,seed,image_id,{column}\n" + "".join(f"{','.join(map(str, r))}\n" for r in rows)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unpaired", "per-image clip values do not pair up at seed 0: images only on the method's side [3]"),
        ("foreign-cell", "a cell scores.csv does not list (1 such cells): files of two runs mixed up?"),
        ("nan", "clip of image 2 is nan"),
        ("no-metric", "no metric column (fid, kid, clip, cmmd)"),
        ("twice", "two per-image files of clip given"),
        ("baseline", "--baseline scfg: "),
        ("bootstrap", "argument --bootstrap: invalid value '0'"),
        ("no-per-image-column", "expected one per-image metric column (clip)"),
    ],
    ids=["unpaired", "foreign-cell", "nan", "no-metric", "twice", "baseline", "bootstrap", "no-per-image-column"],
)
def test_report_refuses(tmp_path, capsys, case, message):
    scores = _scores(tmp_path / "scores.csv", [("cfg", 3, 0, 2, 30.0, 29.0), ("goca", 3, 0, 2, 28.0, 29.5)])
    base = [("cfg", 3, 0, 1, 29.0), ("cfg", 3, 0, 2, 29.1), ("goca", 3, 0, 1, 29.4)]
    rows = {
        "unpaired": [*base, ("goca", 3, 0, 3, 29.6)],
        "foreign-cell": [*base, ("goca", 3, 0, 2, 29.6), ("goca", 5, 0, 1, 30.0)],
        "nan": [*base[:1], ("cfg", 3, 0, 2, "nan"), *base[2:], ("goca", 3, 0, 2, 29.6)],
    }.get(case, [*base, ("goca", 3, 0, 2, 29.6)])
    per_image = [str(_per_image(tmp_path / "clip_per_image.csv", rows))]
    argv = ["--scores", str(scores), "--out", str(tmp_path / "out"), "--bootstrap", "50"]
    if case == "no-metric":
        scores.write_text("method,scale,seed,n_images\ncfg,3,0,2\n")
    elif case == "twice":
        per_image *= 2
    elif case == "baseline":
        argv += ["--baseline", "scfg"]
    elif case == "bootstrap":
        argv[argv.index("--bootstrap") + 1] = "0"
    elif case == "no-per-image-column":
        per_image = [str(_per_image(tmp_path / "p.csv", rows, column="fid"))]
    for path in per_image:
        argv += ["--per-image", path]
    assert _exit_code(report.main, argv) == 2
    assert message in _one_error_line(capsys)


def test_report_baseline_names_the_comparison_columns(tmp_path):
    scores = _scores(tmp_path / "scores.csv", [(m, 3, s, 2, 30.0 - i - s / 10, 29.0 + i) for i, m in
                                                enumerate(("cfg", "scfg", "goca")) for s in (0, 1)])  # fmt: skip
    paths = report.build_report(scores, tmp_path / "out", baseline="scfg", n_resamples=50)
    with open(paths["results"], newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert rows["goca"]["fid_diff_vs_scfg"] == "-1.0000" and "fid_diff_vs_cfg" not in rows["goca"]
    assert "ΔFID vs S-CFG (paired t, p)" in paths["table9"].read_text()
