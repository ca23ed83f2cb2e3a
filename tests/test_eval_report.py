"""Report (eval/report.py) from synthetic score tables: Table 3 and Table 9 layouts, results.csv, the PNG plot."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from eval import report
from eval.stats import paired_t_test

SCALES = (2.0, 3.0, 5.0, 7.5, 10.0)
# Paper Table 3 (algorithm.md §3.2), FID / CLIP per scale.
PAPER = {
    "cfg": [(37.84, 29.84), (24.22, 30.78), (19.27, 31.34), (18.98, 31.53), (19.38, 31.60)],
    "scfg": [(36.45, 29.95), (23.58, 30.84), (19.15, 31.35), (18.90, 31.53), (19.38, 31.60)],
    "goca": [(35.23, 30.05), (22.80, 30.93), (18.82, 31.42), (18.84, 31.57), (19.35, 31.62)],
}


def _write_scores(path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "scale", "seed", "n_images", "fid", "clip", "fid_protocol"])
        writer.writerows(rows)


def test_table3_from_the_paper_numbers(tmp_path):
    rows = [
        (m, w, 42, 30000, fid, clip, "t2ib") for m, values in PAPER.items() for w, (fid, clip) in zip(SCALES, values)
    ]
    _write_scores(tmp_path / "scores.csv", rows)
    paths = report.build_report(tmp_path / "scores.csv", tmp_path / "out")
    table = paths["table3"].read_text(encoding="utf-8").splitlines()
    assert table[0] == "| Method | " + " | ".join(f"w={w:g} FID↓ | w={w:g} CLIP↑" for w in SCALES) + " |"
    assert [line.split(" | ")[0] for line in table[2:5]] == ["| CFG", "| S-CFG", "| GoCA+S-CFG"]
    cfg_row = table[2].strip("| ").split(" | ")
    assert cfg_row[1:] == ["37.84", "29.84", "24.22", "30.78", "19.27", "31.34", "18.98", "31.53", "19.38", "31.60"]
    goca_row = table[4].strip("| ").split(" | ")
    assert goca_row[1] == "**35.23**" and goca_row[2] == "**30.05**"  # best per column in bold
    assert "single seed" in paths["table3"].read_text(encoding="utf-8")
    assert "table9" not in paths  # one seed and no per-image scores: no Table 9


def test_table9_mean_std_and_paired_comparisons(tmp_path):
    rng = np.random.default_rng(0)
    seeds = (0, 1, 2)
    fids = {(m, s): 20.0 - 0.5 * i + rng.normal(0, 0.3) for i, m in enumerate(PAPER) for s in seeds}
    rows = [
        (m, 5.0, s, 10, fids[(m, s)], 31.0 + 0.1 * i + 0.01 * s, "clean") for i, m in enumerate(PAPER) for s in seeds
    ]
    _write_scores(tmp_path / "scores.csv", rows)
    with open(tmp_path / "clip_per_image.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "scale", "seed", "image_id", "clip"])
        for i, m in enumerate(PAPER):
            for s in seeds:
                writer.writerows((m, 5.0, s, image_id, 30.0 + 0.2 * i + 0.01 * image_id) for image_id in range(10))
    paths = report.build_report(tmp_path / "scores.csv", tmp_path / "out", tmp_path / "clip_per_image.csv", 500)

    with open(paths["results"], newline="", encoding="utf-8") as f:
        results = {r["method"]: r for r in csv.DictReader(f)}
    goca = [fids[("goca", s)] for s in seeds]
    cfg = [fids[("cfg", s)] for s in seeds]
    assert float(results["goca"]["fid_mean"]) == pytest.approx(np.mean(goca), abs=1e-4)
    assert float(results["goca"]["fid_std"]) == pytest.approx(np.std(goca, ddof=1), abs=1e-4)
    test = paired_t_test(goca, cfg)
    assert float(results["goca"]["fid_t_vs_cfg"]) == pytest.approx(test.t, abs=1e-4)
    assert float(results["goca"]["fid_p_vs_cfg"]) == pytest.approx(test.p, abs=1e-6)
    # every per-image difference is exactly 0.4 (2 × 0.2), so the bootstrap interval is that point
    assert float(results["goca"]["clip_diff_vs_cfg"]) == pytest.approx(0.4)
    assert float(results["goca"]["clip_ci_low_vs_cfg"]) == pytest.approx(0.4)
    assert results["cfg"]["fid_diff_vs_cfg"] == ""

    table9 = paths["table9"].read_text(encoding="utf-8").splitlines()
    assert table9[0].startswith("| Method | w | w_eff | seeds | FID↓ | KID↓ | CLIP↑ |")
    assert "resampling images (all seeds of an image together)" in paths["table9"].read_text(encoding="utf-8")
    assert results["goca"]["clip_ci_unit"] == "image" and results["cfg"]["clip_ci_unit"] == ""
    goca_line = next(line for line in table9 if line.startswith("| GoCA+S-CFG"))
    assert f"{np.mean(goca):.2f} ± {np.std(goca, ddof=1):.2f}" in goca_line
    assert f"p={test.p:.3g}" in goca_line and "+0.400 [+0.400, +0.400]" in goca_line
    assert "mean over 3 seeds" in paths["table3"].read_text(encoding="utf-8")


def test_plot_is_a_valid_png(tmp_path):
    rows = [(m, w, 0, 5, fid, clip, "") for m, values in PAPER.items() for w, (fid, clip) in zip(SCALES, values)]
    _write_scores(tmp_path / "scores.csv", rows)
    paths = report.build_report(tmp_path / "scores.csv", tmp_path)
    with Image.open(paths["fid_clip"]) as image:
        image.verify()
    with Image.open(paths["fid_clip"]) as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200


def test_cli_prints_table3(tmp_path, capsys):
    rows = [("cfg", 3.0, 0, 4, 30.0, 29.0, ""), ("goca", 3.0, 0, 4, 28.0, 29.5, "")]
    (tmp_path / "metrics").mkdir()
    _write_scores(tmp_path / "metrics" / "scores.csv", rows)
    assert report.main(["--run", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| CFG | 30.00 | 29.00 |" in out and (tmp_path / "report" / "fid_clip.png").is_file()


def test_bad_scores_files(tmp_path):
    (tmp_path / "a.csv").write_text("method,scale\ncfg,3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lacks the columns"):
        report.read_scores(tmp_path / "a.csv")
    _write_scores(tmp_path / "b.csv", [("cfg", 3.0, 0, 1, 1.0, 1.0, ""), ("cfg", 3.0, 0, 1, 2.0, 1.0, "")])
    with pytest.raises(ValueError, match="duplicate"):
        report.read_scores(tmp_path / "b.csv")


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_damaged_csvs_fail_with_file_and_line(tmp_path):
    header = "method,scale,seed,n_images,fid,clip\n"
    truncated = _write(tmp_path / "t.csv", header + "cfg,3,0,2,30.5,29.1\ngoca,3,0,2,28.0\n")
    with pytest.raises(ValueError, match=r"t\.csv, line 3: 5 fields, expected 6 \(damaged or truncated"):
        report.read_scores(truncated)
    garbage = _write(tmp_path / "g.csv", header + "cfg,3,0,2,30.5,29.1\ngoca,3,x,2,28.0,29.0\n")
    with pytest.raises(ValueError, match=r"g\.csv, line 3: bad seed 'x'"):
        report.read_scores(garbage)
    with pytest.raises(ValueError, match=r"e\.csv: empty file"):
        report.read_scores(_write(tmp_path / "e.csv", ""))
    scores = _write(tmp_path / "s.csv", header + "cfg,3,0,2,30.5,29.1\ngoca,3,0,2,28.0,29.4\n")
    per_image = "method,scale,seed,image_id,clip\ncfg,3,0,1,29.0\ncfg,3,0,2,29.2\ngoca,3,0,1,29.4\ngoca,3,0,2,2"
    with pytest.raises(
        ValueError, match=r"p\.csv has 1 per-image CLIP scores for goca w=3 seed 0, but scores.csv says 2"
    ):
        report.build_report(scores, tmp_path / "out", _write(tmp_path / "p.csv", per_image.rsplit("\n", 1)[0]))
    with pytest.raises(ValueError, match=r"q\.csv, line 5: 3 fields, expected 5"):
        report.build_report(scores, tmp_path / "out", _write(tmp_path / "q.csv", per_image[:-5]))
    assert report.main(["--scores", str(truncated)]) == 2


def test_effective_scale_and_kid_columns_and_plot(tmp_path):
    header = "method,scale,seed,n_images,fid,kid,clip,effective_scale\n"
    rows = "cfg,3,0,4,30,0.01,29,3.0\ncfg,5,0,4,25,0.008,30,5.0\n"
    rows += "goca,3,0,4,28,0.009,29.5,2.7\ngoca,5,0,4,24,0.007,30.2,4.4\n"
    paths = report.build_report(_write(tmp_path / "scores.csv", header + rows), tmp_path / "out")
    with open(paths["results"], newline="", encoding="utf-8") as f:
        results = {(r["method"], r["scale"]): r for r in csv.DictReader(f)}
    assert (
        results[("goca", "5")]["effective_scale_mean"] == "4.4000" and results[("cfg", "3")]["kid_mean"] == "0.010000"
    )
    with Image.open(paths["effective"]) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 200
