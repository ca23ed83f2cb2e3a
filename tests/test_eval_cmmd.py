"""CMMD (eval/metric_cmmd.py): the unbiased Gaussian-kernel MMD against a direct numpy computation on random
features, the estimator's diagonal exclusion, and reference embeddings cached by folder, model and content digest."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from eval import metric_cmmd
from eval.metric_cmmd import SCALE, SIGMA, cmmd, normalize_rows, reference_embeddings


def _reference_cmmd(x: np.ndarray, y: np.ndarray, sigma: float = SIGMA) -> float:
    """Paper Eq. 3 written out: full kernel matrices from squared distances, diagonals dropped from the within-set
    means, 1000 × (K_xx + K_yy − 2 K_xy)."""

    def kernel(a, b):
        sq = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-sq / (2 * sigma**2))

    m, n = len(x), len(y)
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return 1000.0 * (within_x + within_y - 2 * kxy.mean())


@pytest.mark.parametrize(
    ("seed", "n", "m", "dim", "block"), [(0, 12, 9, 8, 2048), (1, 70, 45, 32, 16), (2, 5, 130, 16, 7)]
)
def test_cmmd_equals_the_direct_numpy_formula(monkeypatch, seed, n, m, dim, block):
    monkeypatch.setattr(metric_cmmd, "_BLOCK", block)  # blocks smaller than the sets: the blocked sums are exercised
    rng = np.random.default_rng(seed)
    x = normalize_rows(rng.normal(0.0, 1.0, (n, dim)))
    y = normalize_rows(rng.normal(0.4, 1.0, (m, dim)))
    value = cmmd(x, y)
    assert value == pytest.approx(_reference_cmmd(x, y), rel=1e-6)
    assert value > 0 and SCALE == 1000.0 and SIGMA == 10.0
    # raw features (not unit norm) at another bandwidth: the formula, not just the CMMD defaults
    raw_x, raw_y = rng.normal(size=(n, dim)), rng.normal(1.0, 2.0, size=(m, dim))
    assert cmmd(raw_x, raw_y, sigma=3.0) == pytest.approx(_reference_cmmd(raw_x, raw_y, 3.0), rel=1e-6)


def test_the_estimator_is_unbiased_not_the_released_codes_mean_over_all_pairs():
    x = normalize_rows(np.random.default_rng(3).normal(size=(6, 4)))
    # one set against itself: the V-statistic (diagonals kept) would give exactly 0; the unbiased one gives
    # 2 × (mean off the diagonal − mean over all pairs) < 0
    sq = ((x[:, None] - x[None]) ** 2).sum(-1)
    k = np.exp(-sq / (2 * SIGMA**2))
    off_diagonal = (k.sum() - np.trace(k)) / 30
    assert cmmd(x, x) == pytest.approx(1000 * 2 * (off_diagonal - k.mean()), rel=1e-9)
    assert cmmd(x, x) < 0
    two = normalize_rows(np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert metric_cmmd.gaussian_kernel_mean(two) == pytest.approx(np.exp(-2 / (2 * SIGMA**2)))


def test_bad_inputs():
    x = np.ones((3, 4))
    with pytest.raises(ValueError, match=r"need \(N, D\) and \(M, D\)"):
        cmmd(x, np.ones((3, 5)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        cmmd(x, np.ones((1, 4)))
    with pytest.raises(ValueError, match="non-zero rows"):
        normalize_rows(np.zeros((2, 3)))


def _image(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 0, 0)).save(path)


def test_reference_embeddings_are_cached_per_folder_model_and_content(tmp_path, caplog):
    folder = tmp_path / "coco"
    files = [folder / f"{i}.png" for i in range(3)]
    for i, path in enumerate(files):
        _image(path, 40 * i)
    calls = []

    def embed(chosen):
        calls.append(len(chosen))
        return np.stack([[np.asarray(Image.open(p))[0, 0, 0] + 1.0, 1.0] for p in chosen])

    first = reference_embeddings(files, folder, embed, "toy/random", tmp_path / "stats")
    (cached,) = (tmp_path / "stats").iterdir()
    assert cached.name.startswith("cmmd-ref_coco_toy-random_n3_") and calls == [3]
    again = reference_embeddings(files, folder, embed, "toy/random", tmp_path / "stats")
    assert calls == [3] and np.array_equal(again.embeddings, first.embeddings) and again.id == first.id
    np.testing.assert_allclose(np.linalg.norm(first.embeddings, axis=1), 1.0)
    _image(files[1], 200)  # one reference image changes: another digest, another file, recomputed
    changed = reference_embeddings(files, folder, embed, "toy/random", tmp_path / "stats")
    assert calls == [3, 3] and changed.id != first.id and len(list((tmp_path / "stats").iterdir())) == 2
    other_model = reference_embeddings(files, folder, embed, "other/random", tmp_path / "stats")
    assert calls == [3, 3, 3] and other_model.id == changed.id  # same images; the file name holds the model
    newest = max((tmp_path / "stats").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(newest.read_bytes()[:50])  # a damaged cache file is recomputed, with a warning
    with caplog.at_level("WARNING"):
        reference_embeddings(files, folder, embed, "other/random", tmp_path / "stats")
    assert calls == [3, 3, 3, 3] and "recomputing" in caplog.text
    with pytest.raises(ValueError, match="holds toy/random embeddings, not other/random"):
        metric_cmmd.load_reference(cached, "other/random")
    from_file = metric_cmmd.reference_from_file(cached, *metric_cmmd.load_reference(cached, "toy/random"))
    assert from_file.id == first.id and np.array_equal(from_file.embeddings, first.embeddings)  # --cmmd-ref FILE
