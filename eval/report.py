"""Tables and plots from metric scores: `results.csv`, Table 3 and Table 9, metric-vs-CLIP and effective-scale plots.

Input: `scores.csv` (one row per method, scale, seed) and the per-image files (`{metric}_per_image.csv`, e.g.
`clip_per_image.csv`), written by `python -m eval.metrics score`. The metrics and their columns come from the
registry (`eval.registry`). Per (method, scale) we report mean ± std over seeds and paired comparisons with a baseline
(default CFG): a paired t-test over common seeds for metrics with one value per cell (FID, KID, CMMD) and a bootstrap
CI of per-image differences that resamples images (all seeds of an image together; `eval.stats`) for metrics with
per-image values (CLIP score). The effective guidance scale (mean over steps of w·mean(r), from the sweep's guidance
records) gets its own columns, and `effective_scale.png` plots the metrics against it, so that methods can be
compared at equal effective rather than nominal guidance.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from goca_scfg.vocab import BASELINE, method_label, method_rank

from . import io
from .cli_common import OneLineParser, report_error, whole_number
from .metric_base import MetricEntry
from .registry import entries
from .stats import BootstrapCI, MeanStd, PairedTTest, bootstrap_ci, mean_std, paired_t_test

logger = logging.getLogger(__name__)

CellKey = tuple[str, float, int]  # (method, scale, seed)
PerImage = Mapping[CellKey, Mapping[int, float]]  # one metric's per-image values: {cell: {image_id: value}}


@dataclass(frozen=True)
class Score:
    """One row of `scores.csv`: the value of every registered metric (NaN when not computed), the mean effective
    guidance scale and the provenance columns of one (method, scale, seed) folder. `n_images`: None when the file
    does not say."""

    method: str
    scale: float
    seed: int
    values: dict[str, float]
    effective_scale: float = math.nan
    n_images: int | None = None
    provenance: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> CellKey:
        return (self.method, self.scale, self.seed)

    def value(self, name: str) -> float:
        return self.values.get(name, math.nan)


@dataclass(frozen=True)
class SeedComparison:
    """A metric with one value per cell against the baseline: mean over common seeds of method − baseline, and the
    paired t-test (None below 2 common seeds)."""

    diff: float
    test: PairedTTest | None


@dataclass(frozen=True)
class Summary:
    """One (method, scale) over its seeds, with paired comparisons against the baseline at the same seeds/images.

    stats: mean ± std over seeds per metric (None without values); by_seed: paired t-tests of per-cell metrics;
    by_image: bootstrap CIs of per-image differences, paired by (seed, image).
    """

    method: str
    scale: float
    seeds: tuple[int, ...]
    stats: dict[str, MeanStd | None]
    by_seed: dict[str, SeedComparison] = field(default_factory=dict)
    by_image: dict[str, BootstrapCI] = field(default_factory=dict)
    effective_scale: MeanStd | None = None

    def stat(self, name: str) -> MeanStd | None:
        return self.stats.get(name)


def _float(value: str) -> float:
    return float(value) if value.strip() else math.nan


# ---------------------------------------------------------------- reading


def read_scores(path: str | Path) -> list[Score]:
    """Read `scores.csv`: columns method, scale, seed and at least one registered metric (fid, kid, clip, cmmd);
    effective_scale, n_images and the provenance columns when present.

    A damaged file (wrong field count, unparsable number, duplicate cell) fails naming the file and the line.
    """
    registered = entries()
    optional = {e.name: _float for e in registered}
    optional.update({c: str for e in registered for c in e.provenance})
    optional.update(effective_scale=_float, n_images=int)
    rows = io.read_table(path, {"method": str, "scale": float, "seed": int}, optional)
    if not rows:
        raise ValueError(f"{path} has no rows")
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f))
    if not any(e.name in header for e in registered):
        names = ", ".join(e.name for e in registered)
        raise ValueError(f"{path}, line 1: no metric column ({names}); is it a scores.csv of `eval.metrics score`?")
    scores, seen = [], {}
    for line, r in enumerate(rows, start=2):
        key = (r["method"], r["scale"], r["seed"])
        if not math.isfinite(r["scale"]):
            raise ValueError(f"{path}, line {line}: bad scale {r['scale']}")
        if key in seen:
            raise ValueError(f"{path}, line {line}: duplicate (method, scale, seed) {key}, first on line {seen[key]}")
        seen[key] = line
        values = {e.name: r[e.name] for e in registered if r[e.name] is not None}
        provenance = {c: r[c] for e in registered for c in e.provenance if r[c]}
        effective = r["effective_scale"] if r["effective_scale"] is not None else math.nan
        scores.append(Score(*key, values, effective, r["n_images"], provenance))
    return scores


def read_per_image(path: str | Path) -> tuple[str, dict[CellKey, dict[int, float]]]:
    """Read a `{metric}_per_image.csv` (method, scale, seed, image_id, {metric}) as (metric, {cell: {id: value}})."""
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f), None) or []
    names = [e.name for e in entries() if e.per_image and e.name in header]
    if len(names) != 1:
        known = ", ".join(e.name for e in entries() if e.per_image)
        raise ValueError(f"{path}, line 1: expected one per-image metric column ({known}), got the header {header}")
    name = names[0]
    columns = {"method": str, "scale": float, "seed": int, "image_id": int, name: float}
    cells: dict[CellKey, dict[int, float]] = defaultdict(dict)
    for line, r in enumerate(io.read_table(path, columns), start=2):
        values = cells[(r["method"], r["scale"], r["seed"])]
        if r["image_id"] in values:
            raise ValueError(f"{path}, line {line}: image {r['image_id']} appears twice for {r['method']}")
        if not math.isfinite(r[name]):
            raise ValueError(f"{path}, line {line}: {name} of image {r['image_id']} is {r[name]}")
        values[r["image_id"]] = r[name]
    return name, dict(cells)


def check_per_image(scores: Sequence[Score], name: str, per_image: PerImage, path: object) -> None:
    """Every cell of `scores` with a value of metric `name` has exactly its `n_images` per-image values (truncated
    file?), and the file has no cell that `scores` lacks (a file of another run?)."""
    from .registry import get_entry

    label = get_entry(name).label
    known = {s.key for s in scores}
    foreign = sorted(k for k in per_image if k not in known)
    if foreign:
        method, scale, seed = foreign[0]
        raise ValueError(
            f"{path} has per-image {name} values of {method} w={scale:g} seed {seed}, a cell scores.csv does not "
            f"list ({len(foreign)} such cells): files of two runs mixed up?"
        )
    for s in scores:
        if s.n_images is None or not math.isfinite(s.value(name)):
            continue
        found = len(per_image.get(s.key, {}))
        if found != s.n_images:
            raise ValueError(
                f"{path} has {found} per-image {label} scores for {s.method} w={s.scale:g} seed {s.seed}, but "
                f"scores.csv says {s.n_images} images (damaged or truncated file? rerun `eval.metrics score`)"
            )


# ---------------------------------------------------------------- summaries


def _finite_mean_std(values: Sequence[float]) -> MeanStd | None:
    finite = [v for v in values if math.isfinite(v)]
    return mean_std(finite) if finite else None


def paired_per_image(
    name: str, method_cells: Mapping[int, Mapping[int, float]], base_cells: Mapping[int, Mapping[int, float]]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image differences method − baseline over the seeds both sides have, and the image id of each.

    At every common seed both sides must hold the same image ids: an image the other side lacks would otherwise drop
    out of the comparison unseen, so it is an error naming the seed and the first unpaired ids.
    """
    diffs, images = [], []
    for seed in sorted(set(method_cells) & set(base_cells)):
        mine, theirs = method_cells[seed], base_cells[seed]
        if set(mine) != set(theirs):
            only_mine, only_theirs = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
            raise ValueError(
                f"per-image {name} values do not pair up at seed {seed}: images only on the method's side "
                f"{only_mine[:5]}, only on the baseline's side {only_theirs[:5]} (cells of different caption sets?)"
            )
        for image_id in sorted(mine):
            diffs.append(mine[image_id] - theirs[image_id])
            images.append(image_id)
    return np.asarray(diffs, dtype=np.float64), np.asarray(images, dtype=np.int64)


def summarize(
    scores: Sequence[Score],
    per_image: Mapping[str, PerImage] | None = None,
    baseline: str = BASELINE,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> list[Summary]:
    """Mean ± std over seeds per (method, scale) and every metric, and paired comparisons with `baseline`."""
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
            {e.name: _finite_mean_std([runs[k].value(e.name) for k in seeds]) for e in entries()},
            effective_scale=_finite_mean_std([runs[k].effective_scale for k in seeds]),
        )
        base = by_cell.get((baseline, scale))
        if method != baseline and base is not None:
            by_seed, by_image = _compare(runs, base, per_image, n_resamples, seed)
            summary = dataclasses.replace(summary, by_seed=by_seed, by_image=by_image)
        summaries.append(summary)
    return summaries


def _compare(
    runs: Mapping[int, Score],
    base: Mapping[int, Score],
    per_image: Mapping[str, PerImage],
    n_resamples: int,
    seed: int,
) -> tuple[dict[str, SeedComparison], dict[str, BootstrapCI]]:
    """The paired t-tests (common seeds) and the per-image bootstraps (common seeds and images) of one (method,
    scale) against the baseline at the same scale."""
    by_seed: dict[str, SeedComparison] = {}
    by_image: dict[str, BootstrapCI] = {}
    for entry in entries():
        name = entry.name
        common = [k for k in sorted(runs) if k in base and math.isfinite(runs[k].value(name))]
        common = [k for k in common if math.isfinite(base[k].value(name))]
        if common:
            a, b = [runs[k].value(name) for k in common], [base[k].value(name) for k in common]
            test = paired_t_test(a, b) if len(common) >= 2 else None
            by_seed[name] = SeedComparison(float(np.mean(np.subtract(a, b))), test)
        if not entry.per_image or name not in per_image:
            continue
        values = per_image[name]
        mine = {k: values[runs[k].key] for k in runs if runs[k].key in values}
        theirs = {k: values[base[k].key] for k in base if base[k].key in values}
        diffs, images = paired_per_image(name, mine, theirs)
        if diffs.size:
            by_image[name] = bootstrap_ci(diffs, n_resamples=n_resamples, seed=seed, units=images)
    return by_seed, by_image


# ---------------------------------------------------------------- outputs


def _num(value: float | None, digits: int = 2) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _shown(summaries: Sequence[Summary], primary_only: bool) -> list[MetricEntry]:
    """Entries with a column: the paper's always, the others when some summary has a value."""
    return [
        e
        for e in entries()
        if (e.primary or not primary_only) and (e.always_shown or any(s.stat(e.name) for s in summaries))
    ]


def results_rows(summaries: Sequence[Summary], baseline: str = BASELINE) -> list[dict[str, str]]:
    """Flat rows for `results.csv`, one per (method, scale); comparison columns are named `…_vs_{baseline}`."""
    rows = []
    vs = f"vs_{baseline}"
    for s in summaries:
        row = {"method": s.method, "scale": f"{s.scale:g}", "seeds": " ".join(map(str, s.seeds))}
        row["n_seeds"] = str(len(s.seeds))
        for e in entries():
            stat, digits = s.stat(e.name), e.digits + 2
            row[f"{e.name}_mean"] = _num(stat.mean if stat else None, digits)
            row[f"{e.name}_std"] = _num(stat.std if stat else None, digits)
        for e in entries():
            if e.per_image:
                ci = s.by_image.get(e.name)
                row[f"{e.name}_diff_{vs}"] = _num(ci.mean if ci else None, e.digits + 2)
                row[f"{e.name}_ci_low_{vs}"] = _num(ci.low if ci else None, e.digits + 2)
                row[f"{e.name}_ci_high_{vs}"] = _num(ci.high if ci else None, e.digits + 2)
                row[f"{e.name}_ci_unit"] = "image" if ci else ""
            else:
                cmp = s.by_seed.get(e.name)
                row[f"{e.name}_diff_{vs}"] = _num(cmp.diff if cmp else None, e.digits + 2)
                row[f"{e.name}_t_{vs}"] = _num(cmp.test.t if cmp and cmp.test else None, 4)
                row[f"{e.name}_p_{vs}"] = _num(cmp.test.p if cmp and cmp.test else None, 6)
        row["effective_scale_mean"] = _num(s.effective_scale.mean if s.effective_scale else None, 4)
        row["effective_scale_std"] = _num(s.effective_scale.std if s.effective_scale else None, 4)
        rows.append(row)
    return rows


def write_results_csv(summaries: Sequence[Summary], path: str | Path, baseline: str = BASELINE) -> None:
    """Write `results.csv`."""
    rows = results_rows(summaries, baseline)
    io.atomic_write_text(path, io.csv_text(list(rows[0]), [list(r.values()) for r in rows]))


def _best(values: Mapping[str, float | None], lower_is_better: bool) -> set[str]:
    finite = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
    if len(finite) < 2:
        return set()
    target = min(finite.values()) if lower_is_better else max(finite.values())
    return {k for k, v in finite.items() if math.isclose(v, target)}


def _notes(summaries: Sequence[Summary], shown: Sequence[MetricEntry], scores: Sequence[Score] = ()) -> str:
    """One line naming how each shown metric was made (its note and the provenance values found in scores.csv)."""
    parts = []
    for e in (e for e in shown if any(s.stat(e.name) for s in summaries)):
        found = sorted({s.provenance[c] for s in scores for c in e.provenance if s.provenance.get(c)})
        parts.append(e.note + (f" ({', '.join(found)})" if found else ""))
    return "; ".join(p for p in parts if p)


def table3_markdown(summaries: Sequence[Summary], scores: Sequence[Score] = ()) -> str:
    """Paper Table 3 layout: one row per method, each headline metric (FID↓, CLIP↑, CMMD↓ when computed) for each
    guidance scale w; best per column bold."""
    shown = _shown(summaries, primary_only=True)
    scales = sorted({s.scale for s in summaries})
    methods = sorted({s.method for s in summaries}, key=method_rank)
    cell = {(s.method, s.scale): s for s in summaries}
    header = ["Method"] + [f"w={w:g} {e.label}{e.arrow}" for w in scales for e in shown]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    best = {}
    for w in scales:
        for e in shown:
            means = {m: cell[(m, w)].stat(e.name).mean if (m, w) in cell and cell[(m, w)].stat(e.name) else None
                     for m in methods}  # fmt: skip
            best[(w, e.name)] = _best(means, e.lower_is_better)
    for m in methods:
        row = [method_label(m)]
        for w in scales:
            s = cell.get((m, w))
            for e in shown:
                stat = s.stat(e.name) if s else None
                text = _num(stat.mean if stat else None, e.digits) or "–"
                row.append(f"**{text}**" if m in best[(w, e.name)] else text)
        lines.append("| " + " | ".join(row) + " |")
    n_seeds = sorted({len(s.seeds) for s in summaries})
    note = "single seed" if n_seeds == [1] else f"mean over {'/'.join(map(str, n_seeds))} seeds"
    notes = _notes(summaries, shown, scores)
    return "\n".join(lines) + f"\n\nOn the run's captions; {note}." + (f" {notes}." if notes else "") + "\n"


def _pm(stat: MeanStd | None, digits: int = 2) -> str:
    if stat is None:
        return "–"
    if not math.isfinite(stat.std):
        return _num(stat.mean, digits)
    return f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f}"


def table9_markdown(summaries: Sequence[Summary], baseline: str = BASELINE, scores: Sequence[Score] = ()) -> str:
    """Paper Table 9 layout (App. F): mean ± std over seeds of every metric, plus the paired comparisons of the
    headline metrics with the baseline."""
    shown = _shown(summaries, primary_only=False)
    compared = [e for e in shown if e.primary]
    base = method_label(baseline)
    header = ["Method", "w", "w_eff", "seeds", *(f"{e.label}{e.arrow}" for e in shown)]
    header += [f"Δ{e.label} vs {base} " + ("[95% CI]" if e.per_image else "(paired t, p)") for e in compared]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for s in sorted(summaries, key=lambda s: (s.scale, method_rank(s.method))):
        row = [method_label(s.method), f"{s.scale:g}", _pm(s.effective_scale), str(len(s.seeds))]
        row += [_pm(s.stat(e.name), e.digits) for e in shown]
        for e in compared:
            if e.per_image:
                ci, d = s.by_image.get(e.name), e.digits + 1
                row.append("–" if ci is None else f"{ci.mean:+.{d}f} [{ci.low:+.{d}f}, {ci.high:+.{d}f}]")
                continue
            cmp, d = s.by_seed.get(e.name), e.digits
            if cmp is None:
                row.append("–")
            elif cmp.test is None:
                row.append(f"{cmp.diff:+.{d}f} (n<2)")
            else:
                row.append(f"{cmp.diff:+.{d}f} (t={cmp.test.t:.2f}, p={cmp.test.p:.3g})")
        lines.append("| " + " | ".join(row) + " |")
    return (
        "\n".join(lines) + "\n\nmean ± sample std over seeds; w_eff: effective guidance scale, mean over steps of "
        "w·mean(r); per-cell metrics: paired t-test over common seeds; per-image metrics: percentile bootstrap of "
        "per-image differences paired by (seed, image), resampling images (all seeds of an image together)."
        + (f" {notes}." if (notes := _notes(summaries, shown, scores)) else "")
        + "\n"
    )


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def plot_tradeoff(
    summaries: Sequence[Summary], path: str | Path, y: MetricEntry | None = None, x: MetricEntry | None = None
) -> None:
    """Metric `y` (default FID) against per-image metric `x` (default CLIP) across guidance scales, one line per
    method (PNG); error bars show std over seeds."""
    from .registry import get_entry

    y, x = y or get_entry("fid"), x or get_entry("clip")
    fig = _figure(6, 4.5)
    ax = fig.add_subplot()
    plotted = 0
    for method in sorted({s.method for s in summaries}, key=method_rank):
        points = [s for s in summaries if s.method == method and s.stat(y.name) and s.stat(x.name)]
        points.sort(key=lambda s: s.scale)
        if not points:
            continue
        plotted += 1
        xs, ys = [p.stat(x.name).mean for p in points], [p.stat(y.name).mean for p in points]
        xerr = [p.stat(x.name).std if math.isfinite(p.stat(x.name).std) else 0.0 for p in points]
        yerr = [p.stat(y.name).std if math.isfinite(p.stat(y.name).std) else 0.0 for p in points]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", capsize=2, label=method_label(method))
        for p, xi, yi in zip(points, xs, ys):
            ax.annotate(f"w={p.scale:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"{x.label} {x.arrow}")
    ax.set_ylabel(f"{y.label} {y.arrow}")
    ax.set_title(f"{y.label} vs {x.label} across guidance scales")
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=8)
    else:
        text = f"no (method, scale) has both {y.label} and {x.label}"
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_effective(summaries: Sequence[Summary], path: str | Path, shown: Sequence[MetricEntry] | None = None) -> None:
    """Each headline metric against the effective guidance scale (PNG): one panel per metric, one line per method,
    points at each nominal w."""
    shown = list(shown) if shown is not None else _shown(summaries, primary_only=True)
    fig = _figure(5 * max(1, len(shown)), 4.5)
    axes = fig.subplots(1, max(1, len(shown)), squeeze=False)[0]
    plotted = 0
    for method in sorted({s.method for s in summaries}, key=method_rank):
        points = sorted((s for s in summaries if s.method == method and s.effective_scale), key=lambda s: s.scale)
        for ax, e in zip(axes, shown):
            kept = [p for p in points if p.stat(e.name)]
            if not kept:
                continue
            plotted += 1
            xs, ys = [p.effective_scale.mean for p in kept], [p.stat(e.name).mean for p in kept]
            ax.plot(xs, ys, marker="o", label=method_label(method))
            for p, xi, yi in zip(kept, xs, ys):
                ax.annotate(f"w={p.scale:g}", (xi, yi), xytext=(4, 4), fontsize=7, textcoords="offset points")
    for ax, e in zip(axes, shown):
        ax.set_xlabel("effective guidance scale  mean_t(w·mean r)")
        ax.set_ylabel(f"{e.label} {e.arrow}")
        ax.set_title(f"{e.label} at equal effective guidance")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not plotted:
        fig.text(0.5, 0.5, "no effective-scale records (sweep guidance CSVs)", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, format="png")


def build_report(
    scores_csv: str | Path,
    out_dir: str | Path,
    per_image_csv: str | Path | Sequence[str | Path] | None = None,
    n_resamples: int = 10_000,
    seed: int = 0,
    baseline: str = BASELINE,
) -> dict[str, Path]:
    """Write results.csv, table3.md, table9.md (when some cell has several seeds or a per-image comparison), one
    `{metric}_{per-image metric}.png` trade-off plot per headline pair (fid_clip.png, cmmd_clip.png) and
    effective_scale.png to `out_dir`. `per_image_csv`: one or several `{metric}_per_image.csv` files."""
    scores = read_scores(scores_csv)
    methods = {s.method for s in scores}
    if baseline not in methods:
        logger.warning("no %s rows in %s: no paired comparisons (methods: %s)", baseline, scores_csv, sorted(methods))
    paths_in = [per_image_csv] if isinstance(per_image_csv, str | Path) else list(per_image_csv or [])
    per_image: dict[str, PerImage] = {}
    for path in paths_in:
        name, values = read_per_image(path)
        if name in per_image:
            raise ValueError(f"two per-image files of {name} given ({path})")
        check_per_image(scores, name, values, path)
        per_image[name] = values
    summaries = summarize(scores, per_image, baseline, n_resamples=n_resamples, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": out_dir / "results.csv", "table3": out_dir / "table3.md"}
    write_results_csv(summaries, paths["results"], baseline)
    io.atomic_write_text(paths["table3"], table3_markdown(summaries, scores))
    if any(len(s.seeds) > 1 for s in summaries) or any(s.by_image for s in summaries):
        paths["table9"] = out_dir / "table9.md"
        io.atomic_write_text(paths["table9"], table9_markdown(summaries, baseline, scores))
    shown = _shown(summaries, primary_only=True)
    pairs = [(y, x) for y in shown if not y.per_image for x in shown if x.per_image]
    pairs = [(y, x) for y, x in pairs if any(s.stat(y.name) and s.stat(x.name) for s in summaries)] or pairs[:1]
    for y, x in pairs:
        paths[f"{y.name}_{x.name}"] = out_dir / f"{y.name}_{x.name}.png"
        plot_tradeoff(summaries, paths[f"{y.name}_{x.name}"], y, x)
    paths["effective"] = out_dir / "effective_scale.png"
    plot_effective(summaries, paths["effective"], shown)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m eval.report --run DIR` (or `--scores CSV`): tables and the plots."""
    parser = OneLineParser(prog="goca-scfg-report", description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="sweep folder; reads {run}/metrics/scores.csv and per-image files")
    parser.add_argument("--scores", type=Path, help="scores.csv (default: {run}/metrics/scores.csv)")
    parser.add_argument(
        "--per-image",
        type=Path,
        action="append",
        help="a {metric}_per_image.csv (repeatable; default: every one next to scores.csv, e.g. clip_per_image.csv)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: {run}/report or next to scores.csv)")
    parser.add_argument(
        "--baseline", default=BASELINE, help=f"method the others are compared with (default {BASELINE})"
    )
    parser.add_argument(
        "--bootstrap", type=whole_number(1), default=10_000, help="bootstrap resamples (default 10000)"
    )
    parser.add_argument("--seed", type=whole_number(0), default=0, help="bootstrap RNG seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.scores is None and args.run is None:
        parser.error("give --run or --scores")
    scores = args.scores or args.run / "metrics" / "scores.csv"
    if not scores.is_file():
        parser.error(f"scores file not found: {scores} (run `python -m eval.metrics score` first)")
    per_image = args.per_image
    if per_image is None:
        found = (scores.parent / e.per_image_file for e in entries() if e.per_image)
        per_image = [p for p in found if p.is_file()]
    out = args.out or (args.run / "report" if args.run else scores.parent / "report")
    try:
        if args.baseline != BASELINE and args.baseline not in {s.method for s in read_scores(scores)}:
            raise ValueError(f"--baseline {args.baseline}: {scores} has no rows of that method")
        paths = build_report(
            scores, out, per_image, n_resamples=args.bootstrap, seed=args.seed, baseline=args.baseline
        )
    except (OSError, ValueError) as err:
        return report_error(err)
    print(paths["table3"].read_text(encoding="utf-8"))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
