"""Metrics over a sweep folder (eval/metrics.py): FID and CLIP per cell against direct computations, caching, and
refusal of partial or corrupt folders. The folder is a real manifest (eval.sweep.prepare_output) with random PNGs,
so these tests need no pipeline."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from eval import metrics, sweep
from eval.captions import Caption
from eval.clip_score import CLIPSpec, LoadedCLIP
from eval.fid import FIDProtocol, load_stats, preprocess
from eval.metric_clip import CLIPScore, clip_feature_pass
from eval.metric_cmmd import CMMD, CMMDReference, reference_embeddings
from eval.metric_fid import FID, KID, protocol_from_args

PROTOCOL = FIDProtocol("clean")
CAPTIONS = (Caption(11, "a red car"), Caption(22, "a dog"), Caption(33, "two birds\non a wire"), Caption(44, "a cake"))


def _stand_in(x: torch.Tensor) -> torch.Tensor:
    """3-d stand-in features: the mean colour (no Inception weights offline)."""
    return x.mean(dim=(2, 3)) / 255.0


def _reference_fid(x: np.ndarray, y: np.ndarray) -> float:
    mx, my, sx, sy = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return float(((mx - my) ** 2).sum() + np.trace(sx + sy - 2 * linalg.sqrtm(sx @ sy).real))


def _features(paths) -> np.ndarray:
    arrays = [preprocess(np.asarray(Image.open(p).convert("RGB")), PROTOCOL) for p in paths]
    return _stand_in(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)).double().numpy()


def _random_png(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 256, 3)
    noise = rng.integers(-40, 40, (64, 64, 3))
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path)


def _make_run(out: Path, methods=("cfg", "goca"), seeds=(0, 1), captions=CAPTIONS, seed=0) -> Path:
    plan = sweep.SweepPlan(
        out=out,
        methods=tuple(sweep.get_method(m) for m in methods),
        scales=(3.0,),
        seeds=seeds,
        captions=captions,
        source=sweep.CaptionSource("inline", "-", None, None),
        settings=sweep.GenerationSettings(model="tiny-random", dtype="fp32", steps=2, height=64, width=64),
    )
    sweep.prepare_output(plan, torch.device("cpu"), write=True)
    rng = np.random.default_rng(seed)
    for cell in sweep.io.read_json(plan.out / "manifest.json")["cells"]:
        for c in captions:
            _random_png(plan.out / cell["path"] / f"{c.image_id}.png", rng)
    return plan.out


@pytest.fixture
def run(tmp_path) -> Path:
    return _make_run(tmp_path / "run")


@pytest.fixture
def fid_setup(tmp_path) -> metrics.FIDSetup:
    rng = np.random.default_rng(1)
    real = []
    for i in range(12):
        real.append(tmp_path / "real" / f"COCO_val2014_{i:012d}.jpg")
        _random_png(real[-1], rng)
    path = metrics.reference_stats(real, "toy", tmp_path / "stats", PROTOCOL, _stand_in, "standin")
    assert path.name == "toy_clean-ccrop-299_standin_n12.npz"
    return metrics.FIDSetup(load_stats(path), "toy", PROTOCOL, _stand_in, "standin")


class _StandInCLIPModel:
    """Fast stand-in for an open_clip model: mean colour for images, a fixed embedding per token id for texts."""

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(2, 3))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        table = torch.linspace(-1, 1, 3 * 64).reshape(64, 3)
        return table[tokens % 64].sum(dim=1)


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1) + 0.1


def _tokens(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[ord(ch) for ch in text[:8].ljust(8)] for text in texts])


def _stand_in_clip() -> LoadedCLIP:
    return LoadedCLIP(CLIPSpec("stand-in", None), _StandInCLIPModel(), _pixels, _tokens)


@pytest.fixture
def clip() -> LoadedCLIP:
    return _stand_in_clip()


def _score(run: Path, fid=None, clip=None, batch_size: int = 64, cmmd=None, **kwargs) -> Path:
    """`score_run` with FID and KID of the `fid` setup, the CLIP score of `clip` and CMMD against the reference
    `cmmd` (with `clip`'s embeddings); returns scores.csv."""
    chosen = ([FID(fid), KID(fid)] if fid is not None else []) + ([CLIPScore(clip)] if clip is not None else [])
    chosen += [CMMD(clip, cmmd)] if cmmd is not None else []
    return metrics.score_run(run, chosen, batch_size, **kwargs).scores_csv


def _cmmd_reference(folder: Path, clip: LoadedCLIP, rows_of=None) -> CMMDReference:
    """Reference embeddings of the PNG/JPEG files in `folder` through `clip`'s image pass (no cache file)."""
    files = sorted(folder.iterdir())
    features = clip_feature_pass(clip)
    return reference_embeddings(files, folder, lambda chosen: features.compute(chosen, 5, "cpu", 0, False),
                                clip.spec.name, None, rows_of)  # fmt: skip


def _embeddings(clip: LoadedCLIP, paths) -> np.ndarray:
    """One image at a time, straight through the model: the stand-in's CLIP image embeddings, unit norm."""
    rows = [clip.model.encode_image(clip.preprocess(Image.open(p).convert("RGB"))[None])[0].double() for p in paths]
    rows = torch.stack(rows).numpy()
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _reference_cmmd(x: np.ndarray, y: np.ndarray) -> float:
    """1000 × (mean_{i≠j} k(x_i, x_j) + mean_{i≠j} k(y_i, y_j) − 2 mean k(x_i, y_j)), k Gaussian with σ = 10."""
    kernel = [np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / 200.0) for a, b in ((x, x), (y, y), (x, y))]
    within = [(k.sum() - np.trace(k)) / (len(k) * (len(k) - 1)) for k in kernel[:2]]
    return 1000.0 * (within[0] + within[1] - 2 * kernel[2].mean())


def _reference_clip(clip: LoadedCLIP, path: Path, caption: str) -> float:
    image = clip.model.encode_image(clip.preprocess(Image.open(path).convert("RGB"))[None])[0]
    text = clip.model.encode_text(clip.tokenizer([caption]))[0]
    return 100.0 * float(torch.dot(image, text) / (image.norm() * text.norm()))


def test_scores_equal_direct_fid_and_clip(run, fid_setup, clip, tmp_path):
    out = _score(run, fid_setup, clip, batch_size=3)
    real = sorted((tmp_path / "real").iterdir())
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["scale"], r["seed"]) for r in rows] == [
        ("cfg", "3", "0"),
        ("cfg", "3", "1"),
        ("goca", "3", "0"),
        ("goca", "3", "1"),
    ]
    with open(out.with_name("clip_per_image.csv"), newline="", encoding="utf-8") as f:
        per_image = list(csv.DictReader(f))
    assert len(per_image) == 4 * len(CAPTIONS)
    for row in rows:
        folder = run / sweep.cell_path(row["method"], float(row["scale"]), int(row["seed"]))
        files = [folder / f"{c.image_id}.png" for c in CAPTIONS]
        assert float(row["fid"]) == pytest.approx(_reference_fid(_features(files), _features(real)), rel=1e-6)
        mine = {
            int(r["image_id"]): float(r["clip"])
            for r in per_image
            if (r["method"], r["seed"]) == (row["method"], row["seed"])
        }
        expected = {c.image_id: _reference_clip(clip, folder / f"{c.image_id}.png", c.text) for c in CAPTIONS}
        assert mine == pytest.approx(expected, abs=1e-4)
        assert float(row["clip"]) == pytest.approx(np.mean(list(mine.values())), rel=1e-9)
        assert (row["n_images"], row["fid_protocol"], row["fid_extractor"]) == ("4", "clean-ccrop-299", "standin")
        assert row["clip_model"] == "stand-in/random"


def test_cached_cells_are_not_recomputed(run, fid_setup):
    first = _score(run, fid_setup).read_text(encoding="utf-8")

    def must_not_run(x):
        raise AssertionError("features recomputed for a cached cell")

    cached = metrics.FIDSetup(fid_setup.reference, "toy", PROTOCOL, must_not_run, "standin")
    assert _score(run, cached).read_text(encoding="utf-8") == first
    with pytest.raises(AssertionError, match="recomputed"):
        _score(run, cached, None, force=True)


def test_a_partial_folder_is_refused_naming_the_missing_file(run, fid_setup):
    (run / "goca/cfg-3.0/seed-1/33.png").unlink()
    with pytest.raises(
        ValueError, match=r"partial run: .*goca/cfg-3.0/seed-1 holds 3 images but the manifest lists 4.*33\.png"
    ):
        _score(run, fid_setup)


def test_an_unexpected_image_is_refused(run, fid_setup):
    Image.new("RGB", (8, 8)).save(run / "cfg/cfg-3.0/seed-0/99.png")
    with pytest.raises(ValueError, match=r"not in the manifest: 99\.png"):
        _score(run, fid_setup)


def test_a_corrupt_png_is_named(run, fid_setup):
    (run / "cfg/cfg-3.0/seed-1/22.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(
        ValueError, match=r"cfg/cfg-3.0/seed-1: 1 image\(s\) unreadable or not RGB 64x64, e.g. 22\.png"
    ):
        _score(run, fid_setup)
    data = (run / "goca/cfg-3.0/seed-0/33.png").read_bytes()
    (run / "cfg/cfg-3.0/seed-1/22.png").write_bytes(data[: len(data) // 2])  # header intact, pixels truncated
    with pytest.raises(ValueError, match=r"cannot read image .*cfg-3.0/seed-1/22\.png"):
        _score(run, fid_setup)


def test_missing_manifest_and_reference_stats(tmp_path, run, capsys):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        metrics.read_run(tmp_path)
    assert metrics.main(["score", "--run", str(run), "--ref-stats", str(tmp_path / "nope.npz"), "--no-clip"]) == 2
    assert re.search(r"error: reference statistics not found: .*nope\.npz", capsys.readouterr().err)


def test_reference_images_are_selected_by_coco_id(tmp_path):
    files = [Path(f"COCO_val2014_{i:012d}.jpg") for i in (42, 73, 521669)] + [Path("7.png")]
    assert metrics.select_reference_images(files, [521669, 7, 42]) == [files[2], files[3], files[0]]
    with pytest.raises(ValueError, match=r"1 of 2 caption ids have no image, e.g. \[5\]"):
        metrics.select_reference_images(files, [42, 5])


def test_cli_clip_and_cmmd_with_random_weights(tmp_path, capsys, monkeypatch):
    """CLIP score and CMMD from one random ViT-B-32 (one model load, one image pass), the reference embeddings cached
    under --cmmd-cache."""
    run = _make_run(tmp_path / "small", methods=("cfg",), seeds=(0,), captions=CAPTIONS[:2])
    for c in CAPTIONS[:3]:
        _random_png(tmp_path / "coco" / f"COCO_val2014_{c.image_id:012d}.jpg", np.random.default_rng(c.image_id))
    argv = ["score", "--run", str(run), "--no-fid", "--clip-pretrained", "none", "--workers", "0"]
    argv += ["--cmmd-ref", str(tmp_path / "coco"), "--cmmd-model", "ViT-B-32", "--cmmd-pretrained", "none"]
    argv += ["--cmmd-cache", str(tmp_path / "stats")]
    from eval import clip_score

    loads = []
    load = clip_score.load_clip
    monkeypatch.setattr(clip_score, "load_clip", lambda *a, **k: loads.append(a) or load(*a, **k))
    assert metrics.main(argv) == 0
    assert "ViT-B-32/random" in capsys.readouterr().out and len(loads) == 1
    assert (run / "metrics" / "clip_per_image.csv").is_file()
    (row,) = _rows(run / "metrics" / "scores.csv").values()
    assert math.isfinite(float(row["clip"])) and math.isfinite(float(row["cmmd"])) and row["cmmd_model"]
    (cache,) = (tmp_path / "stats").iterdir()  # the 2 images of the run's caption ids, found by COCO id
    assert cache.name.startswith("cmmd-ref_coco_ViT-B-32-random_n2_")


def _rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return {(r["method"], r["seed"]): r for r in csv.DictReader(f)}


def test_replacing_one_image_rescores_its_cell_without_force(run, fid_setup, clip, tmp_path):
    first = _rows(_score(run, fid_setup, clip))
    assert all(math.isfinite(float(r["kid"])) for r in first.values())  # the reference kept its features
    _random_png(run / "goca/cfg-3.0/seed-1/22.png", np.random.default_rng(7))
    second = _rows(_score(run, fid_setup, clip))
    changed = {k for k in first if first[k] != second[k]}
    assert changed == {("goca", "1")}
    for column in ("fid", "kid", "clip", "images_digest"):
        assert first[("goca", "1")][column] != second[("goca", "1")][column]
    assert _rows(_score(run, fid_setup, clip, force=True)) == second  # = a fresh computation


def test_reference_stats_follow_their_image_bytes(tmp_path, caplog):
    rng = np.random.default_rng(2)
    files = [tmp_path / "real" / f"{i}.png" for i in range(6)]
    for path in files:
        _random_png(path, rng)
    args = ("toy", tmp_path / "stats", PROTOCOL, _stand_in, "standin")
    before = load_stats(metrics.reference_stats(files, *args))
    assert before.features.shape == (6, 3) and before.images_digest == sweep.io.files_digest(files)
    _random_png(files[4], rng)
    with caplog.at_level("WARNING"):
        after = load_stats(metrics.reference_stats(files, *args))
    assert "changed since it was computed" in caplog.text
    assert not np.array_equal(before.mu, after.mu)
    np.testing.assert_allclose(after.mu, _features(files).mean(0), rtol=1e-6)


@pytest.mark.parametrize(("mode", "size"), [("RGB", (32, 32)), ("L", (64, 64)), ("RGBA", (64, 64))])
def test_images_unlike_the_manifest_are_refused_before_scoring(run, fid_setup, mode, size):
    Image.new(mode, size).save(run / "cfg/cfg-3.0/seed-0/44.png")
    expected = (
        rf"cfg/cfg-3.0/seed-0: 1 image\(s\) unreadable or not RGB 64x64, e.g. 44\.png: {mode} {size[0]}x{size[1]}"
    )

    def must_not_run(x):
        raise AssertionError("features computed before the check")

    with pytest.raises(ValueError, match=expected):
        _score(run, metrics.FIDSetup(fid_setup.reference, "toy", PROTOCOL, must_not_run, "standin"))


def test_effective_scale_comes_from_the_guidance_records(run, fid_setup):
    for cell in sweep.io.read_json(run / "manifest.json")["cells"]:
        rows = sweep.guidance_rows(CAPTIONS, 3.0, None, iterations=3)
        sweep.io.atomic_write_text(
            sweep.guidance_path(run, cell["path"]), sweep.io.csv_text(sweep.GUIDANCE_COLUMNS, rows)
        )
    scores = _rows(_score(run, fid_setup))
    assert {r["effective_scale"] for r in scores.values()} == {"3.0"}
    path = sweep.guidance_path(run, "goca/cfg-3.0/seed-1")
    path.write_text(path.read_text()[:-30])  # truncated last line
    with pytest.raises(ValueError, match=r"seed-1\.csv, line 5: \d fields, expected 7"):
        _score(run, fid_setup)


def test_missing_clip_weights_give_one_line_naming_the_cache_and_the_flag(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert metrics.main(["score", "--run", str(run), "--no-fid", "--no-download"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "CLIP weights ViT-B-32/openai are not in" in err and "models--timm--vit_base_patch32_clip_224.openai" in err
    assert "--no-download" in err and "--clip-weights FILE" in err


def test_paper_preset_is_the_t2ib_protocol(capsys):
    parser = metrics.build_parser()
    for command in (["score", "--run", "r"], ["ref-stats", "--images", "i"]):
        assert protocol_from_args(parser.parse_args([*command, "--preset", "paper"])) == FIDProtocol("t2ib")
        assert protocol_from_args(parser.parse_args(command)) == FIDProtocol("clean")
    with pytest.raises(ValueError, match="--preset paper scores with --mode t2ib"):
        protocol_from_args(parser.parse_args(["score", "--run", "r", "--preset", "paper", "--mode", "clean"]))


class _PatchModel(_StandInCLIPModel):
    """Image embedding: the top-left 4×4 patch as it is (48-d, no arithmetic, so batching cannot round it)."""

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels[:, :, :4, :4].flatten(1)


def test_cmmd_column_equals_a_direct_numpy_computation(run, tmp_path):
    clip = LoadedCLIP(CLIPSpec("patch", None), _PatchModel(), _pixels, _tokens)
    rng = np.random.default_rng(5)
    for i in range(7):
        _random_png(tmp_path / "coco" / f"COCO_val2014_{i:012d}.png", rng)
    reference = _cmmd_reference(tmp_path / "coco", clip)
    rows = _rows(metrics.score_run(run, [CMMD(clip, reference)], batch_size=3).scores_csv)
    y = _embeddings(clip, sorted((tmp_path / "coco").iterdir()))
    for (method, seed), row in rows.items():
        folder = run / sweep.cell_path(method, 3.0, int(seed))
        x = _embeddings(clip, [folder / f"{c.image_id}.png" for c in CAPTIONS])
        assert float(row["cmmd"]) == pytest.approx(_reference_cmmd(x, y), rel=1e-6)
        assert (row["cmmd_model"], row["cmmd_reference"]) == ("patch/random", reference.id)
        assert row["clip"] == row["fid"] == "nan"


def test_clip_score_and_cmmd_share_one_image_pass(run, clip, tmp_path):
    rng = np.random.default_rng(6)
    for i in range(3):
        _random_png(tmp_path / "coco" / f"{i}.png", rng)
    reference = _cmmd_reference(tmp_path / "coco", clip)
    seen = []
    encode = clip.model.encode_image
    clip.model.encode_image = lambda pixels: seen.append(len(pixels)) or encode(pixels)
    _score(run, clip=clip, cmmd=reference, batch_size=3)
    assert seen == [3, 1] * 4  # 4 cells of 4 images in batches of 3, each embedded once for both metrics
    seen.clear()
    _score(run, clip=clip, cmmd=reference, batch_size=3)
    assert seen == []  # cached
    other = LoadedCLIP(CLIPSpec("stand-in", None, "other-weights.pt"), clip.model, clip.preprocess, clip.tokenizer)
    _score(run, clip=other, cmmd=reference, batch_size=3)  # another model: CLIP score recomputed, not CMMD
    assert seen == [3, 1] * 4


def test_score_help_lists_every_registered_metric(capsys):
    with pytest.raises(SystemExit):
        metrics.main(["score", "--help"])
    text = capsys.readouterr().out
    assert "cmmd   CMMD (Jayasumana et al., CVPR 2024)" in text and "--cmmd-ref" in text and "σ = 10" in text
    for name in ("fid", "kid", "clip", "cmmd"):
        assert f"\n  {name} " in text
    assert metrics.SCORE_COLUMNS[4:8] == ("fid", "kid", "clip", "cmmd")


def _score_in_group(rank: int, world: int, rendezvous: str, run: str, reference: str, real: str) -> None:
    """One process of a gloo group on the CPU scoring `run` (torch.multiprocessing.spawn target): FID, KID, CLIP
    score and CMMD, whose reference embeddings are computed by the group too."""
    import torch.distributed as dist

    from eval.distributed import shared_rows

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        fid = metrics.FIDSetup(load_stats(reference), "toy", PROTOCOL, _stand_in, "standin")
        clip = _stand_in_clip()
        cmmd = _cmmd_reference(Path(real), clip, lambda compute, count: shared_rows(compute, count, 5, "cpu"))
        _score(run, fid, clip, batch_size=3, cmmd=cmmd)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_score_exactly_like_one(tmp_path, fid_setup):
    """Every registered metric (FID, KID, CLIP score, CMMD with its reference embeddings) in a group of two
    processes gives the bytes one process gives."""
    five = (*CAPTIONS, Caption(55, "a boat"))  # batches of 3: [0, 1, 2] on process 0, [3, 4] on process 1
    one, two = (_make_run(tmp_path / name, captions=five, seed=3) for name in ("one", "two"))
    reference = next((tmp_path / "stats").iterdir())
    clip = _stand_in_clip()
    cmmd = _cmmd_reference(tmp_path / "real", clip)  # 12 images in batches of 5: 2 + 1 batches in the group
    _score(one, metrics.FIDSetup(load_stats(reference), "toy", PROTOCOL, _stand_in, "standin"), clip, 3, cmmd)
    args = (2, str(tmp_path / "rendezvous"), str(two), str(reference), str(tmp_path / "real"))
    torch.multiprocessing.spawn(_score_in_group, args=args, nprocs=2, join=True)
    header = (one / "metrics" / "scores.csv").read_text().splitlines()[0].split(",")
    assert [c for c in header if c in ("fid", "kid", "clip", "cmmd")] == ["fid", "kid", "clip", "cmmd"]
    with open(one / "metrics" / "scores.csv", newline="") as f:
        assert all(math.isfinite(float(r[m])) for r in csv.DictReader(f) for m in ("fid", "kid", "clip", "cmmd"))
    for name in ("scores.csv", "clip_per_image.csv"):
        assert (two / "metrics" / name).read_text() == (one / "metrics" / name).read_text()
    with pytest.raises(AssertionError):  # the comparison can fail: other images give other digits
        assert (one / "metrics" / "scores.csv").read_text() == _score_copy(tmp_path, five)


def _score_copy(tmp_path: Path, captions) -> str:
    other = _make_run(tmp_path / "other", captions=captions, seed=4)
    fid = metrics.FIDSetup(load_stats(next((tmp_path / "stats").iterdir())), "toy", PROTOCOL, _stand_in, "standin")
    clip = _stand_in_clip()
    return _score(other, fid, clip, 3, _cmmd_reference(tmp_path / "real", clip)).read_text()
