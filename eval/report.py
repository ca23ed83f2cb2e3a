"""Tables and the trade-off plot from metric scores: `results.csv`, Table 3 and Table 9, FID-vs-CLIP.

Input: `scores.csv` (one row per method, scale, seed) and optionally `clip_per_image.csv`, both written by
`python -m eval.metrics score`. Per (method, scale) we report mean ± std over seeds and paired comparisons with the
baseline (CFG): a paired t-test on per-seed FID and a bootstrap CI on per-image CLIP differences that resamples
images (all seeds of an image together; `eval.stats`). KID and the effective guidance scale (mean over steps of
w·mean(r), from the sweep's guidance records) get their own columns, and `fid_clip_effective.png` plots FID and CLIP
against the effective scale, so that methods can be compared at equal effective rather than nominal guidance.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from goca_scfg.vocab import BASELINE, method_label, method_rank

from . import io
from .stats import BootstrapCI, MeanStd, PairedTTest, bootstrap_ci, mean_std, paired_t_test

logger = logging.getLogger(__name__)

CellKey = tuple[str, float, int]  # (method, scale, seed)


@dataclass(frozen=True)
class Score:
    """One row of `scores.csv`: FID, mean CLIP score, KID and mean effective guidance scale of one (method, scale,
    seed) folder; NaN when not computed. `n_images`: None when the file does not say."""

    method: str
    scale: float
    seed: int
    fid: float
    clip: float
    kid: float = math.nan
    effective_scale: float = math.nan
    n_images: int | None = None


@dataclass(frozen=True)
class Summary:
    """One (method, scale) over its seeds, with paired comparisons against the baseline at the same seeds/images."""

    method: str
    scale: float
    seeds: tuple[int, ...]
    fid: MeanStd | None
    clip: MeanStd | None
    fid_diff: float | None = None  # mean over common seeds of FID(method) − FID(baseline)
    fid_test: PairedTTest | None = None  # needs >= 2 common seeds
    clip_diff: BootstrapCI | None = None  # per-image CLIP(method) − CLIP(baseline), paired by (seed, image)
    kid: MeanStd | None = None
    effective_scale: MeanStd | None = None


def _float(value: str) -> float:
    return float(value) if value.strip() else math.nan


# ---------------------------------------------------------------- reading


def read_scores(path: str | Path) -> list[Score]:
    """Read `scores.csv` (columns method, scale, seed, fid, clip; kid, effective_scale, n_images when present).

    A damaged file (wrong field count, unparsable number, duplicate cell) fails naming the file and the line.
    """
    rows = io.read_table(
        path,
        {"method": str, "scale": float, "seed": int, "fid": _float, "clip": _float},
        {"kid": _float, "effective_scale": _float, "n_images": int},
    )
    if not rows:
        raise ValueError(f"{path} has no rows")
    scores, seen = [], {}
    for line, r in enumerate(rows, start=2):
        key = (r["method"], r["scale"], r["seed"])
        if key in seen:
            raise ValueError(f"{path}, line {line}: duplicate (method, scale, seed) {key}, first on line {seen[key]}")
        seen[key] = line
        optional = {k: r[k] for k in ("kid", "effective_scale") if r[k] is not None}
        scores.append(Score(*key, r["fid"], r["clip"], n_images=r["n_images"], **optional))
    return scores


def read_per_image_clip(path: str | Path) -> dict[CellKey, dict[int, float]]:
    """Read `clip_per_image.csv` (method, scale, seed, image_id, clip) into {cell: {image_id: score}}."""
    columns = {"method": str, "scale": float, "seed": int, "image_id": int, "clip": float}
    cells: dict[CellKey, dict[int, float]] = defaultdict(dict)
    for line, r in enumerate(io.read_table(path, columns), start=2):
        scores = cells[(r["method"], r["scale"], r["seed"])]
        if r["image_id"] in scores:
            raise ValueError(f"{path}, line {line}: image {r['image_id']} appears twice for {r['method']}")
        scores[r["image_id"]] = r["clip"]
    return dict(cells)


def check_per_image(scores: Sequence[Score], per_image: Mapping[CellKey, Mapping[int, float]], path: object) -> None:
    """Every cell of `scores` with a CLIP score must have exactly its `n_images` per-image scores (truncated file?)."""
    for s in scores:
        if s.n_images is None or not math.isfinite(s.clip):
            continue
        found = len(per_image.get((s.method, s.scale, s.seed), {}))
        if found != s.n_images:
            raise ValueError(
                f"{path} has {found} per-image CLIP scores for {s.method} w={s.scale:g} seed {s.seed}, but "
                f"scores.csv says {s.n_images} images (damaged or truncated file? rerun `eval.metrics score`)"
            )


# ---------------------------------------------------------------- summaries


def _finite_mean_std(values: Sequence[float]) -> MeanStd | None:
    finite = [v for v in values if math.isfinite(v)]
    return mean_std(finite) if finite else None


def _paired_clip(
    method_cells: Mapping[int, Mapping[int, float]], base_cells: Mapping[int, Mapping[int, float]]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image CLIP differences over the (seed, image_id) pairs both sides have, and the image id of each."""
    pairs = [
        (scores[image_id] - base_cells[seed][image_id], image_id)
        for seed, scores in sorted(method_cells.items())
        if seed in base_cells
        for image_id in sorted(scores)
        if image_id in base_cells[seed]
    ]
    diffs = np.asarray([d for d, _ in pairs], dtype=np.float64)
    return diffs, np.asarray([i for _, i in pairs], dtype=np.int64)


def summarize(
    scores: Sequence[Score],
    per_image: Mapping[CellKey, Mapping[int, float]] | None = None,
    baseline: str = BASELINE,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> list[Summary]:
    """Mean ± std over seeds per (method, scale) and paired comparisons with `baseline`."""
    by_cell: dict[tuple[str, float], dict[int, Score]] = defaultdict(dict)
    for s in scores:
        by_cell[(s.method, s.scale)][s.seed] = s
    per_image = per_image or {}
    summaries = []
    for method, scale in sorted(by_cell, key=lambda k: (method_rank(k[0]), k[1])):
        runs = by_cell[(method, scale)]
        seeds = sorted(runs)
        summary = Summary(
            method,
            scale,
            tuple(seeds),
            _finite_mean_std([runs[k].fid for k in seeds]),
            _finite_mean_std([runs[k].clip for k in seeds]),
            kid=_finite_mean_std([runs[k].kid for k in seeds]),
            effective_scale=_finite_mean_std([runs[k].effective_scale for k in seeds]),
        )
        base = by_cell.get((baseline, scale))
        if method != baseline and base is not None:
            summary = _compare(summary, runs, base, method, baseline, per_image, n_resamples, seed)
        summaries.append(summary)
    return summaries


def _compare(
    summary: Summary,
    runs: Mapping[int, Score],
    base: Mapping[int, Score],
    method: str,
    baseline: str,
    per_image: Mapping[CellKey, Mapping[int, float]],
    n_resamples: int,
    seed: int,
) -> Summary:
    """Fill the paired FID test (common seeds) and the per-image CLIP bootstrap (common seeds and images)."""
    common = [k for k in sorted(runs) if k in base and math.isfinite(runs[k].fid) and math.isfinite(base[k].fid)]
    fid_diff = fid_test = clip_diff = None
    if common:
        a, b = [runs[k].fid for k in common], [base[k].fid for k in common]
        fid_diff = float(np.mean(np.subtract(a, b)))
        fid_test = paired_t_test(a, b) if len(common) >= 2 else None
    scale = summary.scale
    mine = {k: per_image[(method, scale, k)] for k in runs if (method, scale, k) in per_image}
    theirs = {k: per_image[(baseline, scale, k)] for k in base if (baseline, scale, k) in per_image}
    diffs, images = _paired_clip(mine, theirs)
    if diffs.size:
        clip_diff = bootstrap_ci(diffs, n_resamples=n_resamples, seed=seed, units=images)
    return dataclasses.replace(summary, fid_diff=fid_diff, fid_test=fid_test, clip_diff=clip_diff)


# ---------------------------------------------------------------- outputs


def _num(value: float | None, digits: int = 2) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def results_rows(summaries: Sequence[Summary]) -> list[dict[str, str]]:
    """Flat rows for `results.csv`: one per (method, scale)."""
    rows = []
    for s in summaries:
        rows.append(
            {
                "method": s.method,
                "scale": f"{s.scale:g}",
                "seeds": " ".join(str(k) for k in s.seeds),
                "n_seeds": str(len(s.seeds)),
                "fid_mean": _num(s.fid.mean if s.fid else None, 4),
                "fid_std": _num(s.fid.std if s.fid else None, 4),
                "clip_mean": _num(s.clip.mean if s.clip else None, 4),
                "clip_std": _num(s.clip.std if s.clip else None, 4),
                "fid_diff_vs_cfg": _num(s.fid_diff, 4),
                "fid_t_vs_cfg": _num(s.fid_test.t if s.fid_test else None, 4),
                "fid_p_vs_cfg": _num(s.fid_test.p if s.fid_test else None, 6),
                "clip_diff_vs_cfg": _num(s.clip_diff.mean if s.clip_diff else None, 4),
                "clip_ci_low_vs_cfg": _num(s.clip_diff.low if s.clip_diff else None, 4),
                "clip_ci_high_vs_cfg": _num(s.clip_diff.high if s.clip_diff else None, 4),
                "clip_ci_unit": "image" if s.clip_diff else "",
                "kid_mean": _num(s.kid.mean if s.kid else None, 6),
                "kid_std": _num(s.kid.std if s.kid else None, 6),
                "effective_scale_mean": _num(s.effective_scale.mean if s.effective_scale else None, 4),
                "effective_scale_std": _num(s.effective_scale.std if s.effective_scale else None, 4),
            }
        )
    return rows


def write_results_csv(summaries: Sequence[Summary], path: str | Path) -> None:
    """Write `results.csv`."""
    rows = results_rows(summaries)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _best(values: Mapping[str, float | None], lower_is_better: bool) -> set[str]:
    finite = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
    if len(finite) < 2:
        return set()
    target = min(finite.values()) if lower_is_better else max(finite.values())
    return {k for k, v in finite.items() if math.isclose(v, target)}


def table3_markdown(summaries: Sequence[Summary]) -> str:
    """Paper Table 3 layout: one row per method, FID↓ and CLIP↑ for each guidance scale w; best per column bold."""
    scales = sorted({s.scale for s in summaries})
    methods = sorted({s.method for s in summaries}, key=method_rank)
    cell = {(s.method, s.scale): s for s in summaries}
    header = ["Method"] + [f"w={w:g} {name}" for w in scales for name in ("FID↓", "CLIP↑")]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    best = {}
    for w in scales:
        fids = {m: cell[(m, w)].fid.mean if (m, w) in cell and cell[(m, w)].fid else None for m in methods}
        clips = {m: cell[(m, w)].clip.mean if (m, w) in cell and cell[(m, w)].clip else None for m in methods}
        best[(w, "fid")], best[(w, "clip")] = _best(fids, True), _best(clips, False)
    for m in methods:
        row = [method_label(m)]
        for w in scales:
            s = cell.get((m, w))
            for key, stat in (("fid", s.fid if s else None), ("clip", s.clip if s else None)):
                text = _num(stat.mean if stat else None) or "–"
                row.append(f"**{text}**" if m in best[(w, key)] else text)
        lines.append("| " + " | ".join(row) + " |")
    n_seeds = sorted({len(s.seeds) for s in summaries})
    note = "single seed" if n_seeds == [1] else f"mean over {'/'.join(map(str, n_seeds))} seeds"
    return "\n".join(lines) + f"\n\nFID↓ and CLIP score↑ (100 × cosine, ViT-B/32) on COCO captions; {note}.\n"


def _pm(stat: MeanStd | None) -> str:
    if stat is None:
        return "–"
    return _num(stat.mean) if not math.isfinite(stat.std) else f"{stat.mean:.2f} ± {stat.std:.2f}"


def table9_markdown(summaries: Sequence[Summary]) -> str:
    """Paper Table 9 layout (App. F): mean ± std over seeds, plus the paired comparisons with CFG."""
    header = ["Method", "w", "w_eff", "seeds", "FID↓", "KID↓", "CLIP↑", "ΔFID vs CFG (paired t, p)"]
    header.append("ΔCLIP vs CFG [95% CI]")
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for s in sorted(summaries, key=lambda s: (s.scale, method_rank(s.method))):
        if s.fid_diff is None:
            fid_cmp = "–"
        elif s.fid_test is None:
            fid_cmp = f"{s.fid_diff:+.2f} (n<2)"
        else:
            fid_cmp = f"{s.fid_diff:+.2f} (t={s.fid_test.t:.2f}, p={s.fid_test.p:.3g})"
        clip_cmp = (
            "–"
            if s.clip_diff is None
            else f"{s.clip_diff.mean:+.3f} [{s.clip_diff.low:+.3f}, {s.clip_diff.high:+.3f}]"
        )
        kid = "–" if s.kid is None else f"{s.kid.mean:.4f}"
        row = [method_label(s.method), f"{s.scale:g}", _pm(s.effective_scale), str(len(s.seeds)), _pm(s.fid), kid]
        row += [_pm(s.clip), fid_cmp, clip_cmp]
        lines.append("| " + " | ".join(row) + " |")
    return (
        "\n".join(lines) + "\n\nmean ± sample std over seeds; w_eff: effective guidance scale, mean over steps of "
        "w·mean(r); ΔFID: paired t-test over common seeds; ΔCLIP: percentile bootstrap of per-image differences "
        "paired by (seed, image), resampling images (all seeds of an image together).\n"
    )


def plot_tradeoff(summaries: Sequence[Summary], path: str | Path) -> None:
    """FID-vs-CLIP curve across guidance scales, one line per method (PNG); error bars show std over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = 0
    for method in sorted({s.method for s in summaries}, key=method_rank):
        points = sorted((s for s in summaries if s.method == method and s.fid and s.clip), key=lambda s: s.scale)
        if not points:
            continue
        plotted += 1
        x = [p.clip.mean for p in points]
        y = [p.fid.mean for p in points]
        xerr = [p.clip.std if math.isfinite(p.clip.std) else 0.0 for p in points]
        yerr = [p.fid.std if math.isfinite(p.fid.std) else 0.0 for p in points]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", capsize=2, label=method_label(method))
        for p, xi, yi in zip(points, x, y):
            ax.annotate(f"w={p.scale:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("CLIP score ↑ (100 × cosine)")
    ax.set_ylabel("FID ↓")
    ax.set_title("FID vs CLIP across guidance scales")
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no (method, scale) has both FID and CLIP", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_effective(summaries: Sequence[Summary], path: str | Path) -> None:
    """FID and CLIP against the effective guidance scale (PNG): one line per method, points at each nominal w."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    plotted = 0
    for method in sorted({s.method for s in summaries}, key=method_rank):
        points = sorted((s for s in summaries if s.method == method and s.effective_scale), key=lambda s: s.scale)
        for ax, metric in zip(axes, ("fid", "clip")):
            kept = [p for p in points if getattr(p, metric)]
            if not kept:
                continue
            plotted += 1
            x = [p.effective_scale.mean for p in kept]
            ax.plot(x, [getattr(p, metric).mean for p in kept], marker="o", label=method_label(method))
            for p, xi in zip(kept, x):
                ax.annotate(f"w={p.scale:g}", (xi, getattr(p, metric).mean), xytext=(4, 4), fontsize=7,
                            textcoords="offset points")  # fmt: skip
    for ax, name in zip(axes, ("FID ↓", "CLIP score ↑ (100 × cosine)")):
        ax.set_xlabel("effective guidance scale  mean_t(w·mean r)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend(fontsize=8)
    axes[0].set_title("FID at equal effective guidance")
    axes[1].set_title("CLIP at equal effective guidance")
    if not plotted:
        fig.text(0.5, 0.5, "no effective-scale records (sweep guidance CSVs)", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, format="png")


def build_report(
    scores_csv: str | Path,
    out_dir: str | Path,
    per_image_csv: str | Path | None = None,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, Path]:
    """Write results.csv, table3.md, table9.md (when some cell has several seeds), fid_clip.png and
    fid_clip_effective.png to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = read_scores(scores_csv)
    per_image = None
    if per_image_csv is not None:
        per_image = read_per_image_clip(per_image_csv)
        check_per_image(scores, per_image, per_image_csv)
    summaries = summarize(scores, per_image, n_resamples=n_resamples, seed=seed)
    paths = {"results": out_dir / "results.csv", "table3": out_dir / "table3.md", "plot": out_dir / "fid_clip.png"}
    paths["effective"] = out_dir / "fid_clip_effective.png"
    write_results_csv(summaries, paths["results"])
    paths["table3"].write_text(table3_markdown(summaries), encoding="utf-8")
    if any(len(s.seeds) > 1 for s in summaries) or any(s.clip_diff is not None for s in summaries):
        paths["table9"] = out_dir / "table9.md"
        paths["table9"].write_text(table9_markdown(summaries), encoding="utf-8")
    plot_tradeoff(summaries, paths["plot"])
    plot_effective(summaries, paths["effective"])
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m eval.report --run DIR` (or `--scores CSV`): tables and the plot."""
    parser = argparse.ArgumentParser(prog="goca-scfg-report", description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="sweep folder; reads {run}/metrics/scores.csv and clip_per_image.csv")
    parser.add_argument("--scores", type=Path, help="scores.csv (default: {run}/metrics/scores.csv)")
    parser.add_argument("--per-image", type=Path, help="clip_per_image.csv (default: next to scores.csv if present)")
    parser.add_argument("--out", type=Path, help="output folder (default: {run}/report or next to scores.csv)")
    parser.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.scores is None and args.run is None:
        parser.error("give --run or --scores")
    scores = args.scores or args.run / "metrics" / "scores.csv"
    if not scores.is_file():
        parser.error(f"scores file not found: {scores} (run `python -m eval.metrics score` first)")
    per_image = args.per_image
    if per_image is None and (scores.parent / "clip_per_image.csv").is_file():
        per_image = scores.parent / "clip_per_image.csv"
    out = args.out or (args.run / "report" if args.run else scores.parent / "report")
    try:
        paths = build_report(scores, out, per_image, n_resamples=args.bootstrap, seed=args.seed)
    except (OSError, ValueError) as err:
        logger.debug("error details", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(paths["table3"].read_text(encoding="utf-8"))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
