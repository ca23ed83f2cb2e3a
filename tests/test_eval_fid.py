"""FID (eval/fid.py): Fréchet distance against a direct scipy computation, the two preprocessing protocols on known
images, statistics files named and checked by protocol, and clear errors. Stand-in features only (≤ 64-d)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from eval import fid
from eval.fid import FIDProtocol, feature_statistics

CLEAN, T2IB = FIDProtocol("clean"), FIDProtocol("t2ib")


def _reference_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """‖μx − μy‖² + Tr(Σx + Σy − 2·sqrtm(Σx Σy)), straight from the definition."""
    mx, my = x.mean(0), y.mean(0)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(sx @ sy).real
    return float(((mx - my) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * np.trace(covmean))


def _stand_in(x: torch.Tensor) -> torch.Tensor:
    """A tiny feature extractor: 2×2 average pooling of the [0, 255] input → 12-d."""
    return torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 2).flatten(1)


@pytest.mark.parametrize(("seed", "dim"), [(0, 8), (1, 32), (2, 64)])
def test_fid_equals_direct_frechet_distance(seed, dim):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (300, dim))
    y = rng.normal(0.3, 1.2, (250, dim)) @ rng.normal(0, 0.3, (dim, dim)) + x[:250] * 0.2
    reference = fid.feature_statistics(y, "p", "e")
    assert fid.fid_from_features(x, reference) == pytest.approx(_reference_frechet(x, y), rel=1e-6)


def test_fid_of_a_set_against_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(200, 16))
    assert fid.fid_from_features(x, fid.feature_statistics(x, "p", "e")) == pytest.approx(0.0, abs=1e-6)


def test_statistics_from_other_protocols_are_refused():
    x = np.random.default_rng(0).normal(size=(20, 4))
    with pytest.raises(ValueError, match="made differently"):
        fid.frechet_distance(fid.feature_statistics(x, "clean-ccrop-299", "e"), fid.feature_statistics(x, "t2ib", "e"))


def test_stats_file_round_trip_records_the_protocol(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 5))
    stats = fid.feature_statistics(x, CLEAN.tag, "standin")
    name = fid.stats_file_name("coco-val2014", CLEAN, "standin", 30)
    assert name == "coco-val2014_clean-ccrop-299_standin_n30.npz"
    assert (
        fid.stats_file_name("coco", FIDProtocol("clean", center_crop=False), "x", 5)
        == "coco_clean-nocrop-299_x_n5.npz"
    )
    fid.save_stats(stats, tmp_path / name)
    loaded = fid.load_stats(tmp_path / name)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert (loaded.count, loaded.protocol, loaded.extractor) == (30, "clean-ccrop-299", "standin")
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_foreign_stats_need_an_explicit_protocol(tmp_path):
    np.savez(tmp_path / "t2ib.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="does not record its protocol"):
        fid.load_stats(tmp_path / "t2ib.npz")
    loaded = fid.load_stats(tmp_path / "t2ib.npz", assume=(T2IB.tag, T2IB.network))
    assert (loaded.protocol, loaded.extractor) == ("t2ib-ccrop-299", "inception-pytorch-fid")


def test_missing_reference_stats_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"reference statistics not found: .*missing\.npz.*ref-stats"):
        fid.load_stats(tmp_path / "missing.npz")


def _striped(width: int = 300, height: int = 200) -> np.ndarray:
    """Red | green | blue columns; the green band is exactly the centred square."""
    image = np.zeros((height, width, 3), np.uint8)
    left = (width - height) // 2
    image[:, :left, 0] = 255
    image[:, left : left + height, 1] = 255
    image[:, left + height :, 2] = 255
    return image


def test_center_crop_is_the_centred_square():
    image = np.arange(4 * 7 * 3, dtype=np.uint8).reshape(4, 7, 3)
    np.testing.assert_array_equal(fid.center_crop(image), image[:, 1:5])  # (7 − 4) // 2 = 1, as T2IBenchmark
    np.testing.assert_array_equal(fid.center_crop(image.transpose(1, 0, 2)), image.transpose(1, 0, 2)[1:5])


@pytest.mark.parametrize("protocol", [CLEAN, T2IB])
def test_centre_crop_then_resize_of_a_known_image(protocol):
    out = fid.preprocess(_striped(), protocol)
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to([0.0, 255.0, 0.0], out.shape), atol=1e-3)


def test_clean_without_crop_keeps_the_side_bands():
    out = fid.preprocess(_striped(), FIDProtocol("clean", center_crop=False))
    assert out[150, 5, 0] == pytest.approx(255, abs=1e-3) and out[150, -5, 2] == pytest.approx(255, abs=1e-3)


def _reference_clean(image: np.ndarray) -> np.ndarray:
    """clean-fid's "clean" resize: each channel as a float PIL image, bicubic to 299, clipped to [0, 255]."""
    channels = [
        np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC))
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=2), 0, 255)


def _reference_t2ib(image: np.ndarray) -> np.ndarray:
    """T2IBenchmark: centre crop, PIL bicubic on the uint8 RGB image (quantised)."""
    return np.asarray(Image.fromarray(fid.center_crop(image)).resize((299, 299), Image.BICUBIC), np.float32)


def test_protocols_match_their_reference_resizers_on_a_random_image():
    image = np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        fid.preprocess(image, FIDProtocol("clean", center_crop=False)), _reference_clean(image)
    )
    np.testing.assert_array_equal(fid.preprocess(image, CLEAN), _reference_clean(fid.center_crop(image)))
    np.testing.assert_array_equal(fid.preprocess(image, T2IB), _reference_t2ib(image))
    clean = fid.preprocess(image, CLEAN)
    t2ib = fid.preprocess(image, T2IB)
    assert np.any(clean != np.round(clean))  # clean-fid keeps the float resize; T2IBenchmark quantises
    np.testing.assert_array_equal(t2ib, np.round(t2ib))


def _write_images(folder, n, seed=0, size=(40, 56)) -> list:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_image_features_are_the_extractor_on_preprocessed_files(tmp_path):
    paths = _write_images(tmp_path, 5)
    features = fid.image_features(paths, _stand_in, CLEAN, batch_size=2)
    expected = [
        _stand_in(
            torch.from_numpy(fid.preprocess(np.asarray(Image.open(p).convert("RGB")), CLEAN)).permute(2, 0, 1)[None]
        )
        for p in paths
    ]
    np.testing.assert_allclose(features, torch.cat(expected).double().numpy(), rtol=1e-6)
    assert features.shape == (5, 12) and features.dtype == np.float64


def test_a_corrupt_png_is_named(tmp_path):
    paths = _write_images(tmp_path, 3)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])  # truncated, as a killed non-atomic writer would leave it
    with pytest.raises(ValueError, match=r"cannot read image .*1\.png"):
        fid.image_features(paths, _stand_in, CLEAN)


@pytest.mark.parametrize("protocol", [CLEAN, T2IB])
def test_missing_inception_weights_is_a_clear_offline_error(tmp_path, protocol):
    name = fid.CLEAN_INCEPTION_FILE if protocol.mode == "clean" else fid.PYTORCH_FID_FILE
    with pytest.raises(FileNotFoundError, match=rf"Inception weights not found at .*{name}.*Download https://"):
        fid.load_inception(protocol, tmp_path / name, allow_download=False)


def test_clean_inception_file_name_is_checked(tmp_path):
    with pytest.raises(ValueError, match="inception-2015-12-05.pt"):
        fid.load_inception(CLEAN, tmp_path / "weights.pt")


def test_local_weights_are_exposed_to_torch_hub_only_inside_the_context(tmp_path):
    weights = tmp_path / "my.pth"
    weights.write_bytes(b"w")
    before = torch.hub.get_dir()
    with fid._torch_hub_checkpoint(weights, fid.PYTORCH_FID_FILE):
        cached = torch.hub.get_dir() + "/checkpoints/" + fid.PYTORCH_FID_FILE
        assert open(cached, "rb").read() == b"w"
    assert torch.hub.get_dir() == before


def _naive_unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the polynomial kernel k(a, b) = (a·b / d + 1)³, written out pair by pair."""
    d = x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1) ** 3

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_kid_is_clean_fids_kernel_distance_and_the_unbiased_mmd():
    from cleanfid.fid import kernel_distance as clean_kid

    from eval.fid import kernel_distance

    rng = np.random.default_rng(0)
    real, fake = rng.normal(0, 1, (30, 5)), rng.normal(0.3, 1.2, (25, 5))
    reference = feature_statistics(real, "p", "e", keep=True)
    state = np.random.get_state()
    np.random.seed(0)
    expected = clean_kid(fake, real)
    np.random.seed(123)
    assert kernel_distance(fake, reference) == expected  # clean-fid's number, seeded, the global RNG left alone
    assert np.random.randint(1 << 30) == np.random.RandomState(123).randint(1 << 30)
    np.random.set_state(state)
    # equal sizes and one subset of all vectors (a permutation of each set): the unbiased MMD² itself
    equal = feature_statistics(real[:25], "p", "e", keep=True)
    assert kernel_distance(fake, equal, subsets=1) == pytest.approx(_naive_unbiased_mmd2(fake, real[:25]), rel=1e-10)
    with pytest.raises(ValueError, match="kept no features"):
        kernel_distance(fake, feature_statistics(real, "p", "e"))
