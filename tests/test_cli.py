"""`goca-scfg generate` end to end on the tiny offline model."""

import pytest
from PIL import Image

from goca_scfg.cli import main


@pytest.mark.parametrize("segmentor", ["goca", "scfg"])
def test_generate_writes_image_and_maps(tmp_path, segmentor):
    out, maps = tmp_path / "img.png", tmp_path / "maps.png"
    argv = ["generate", "--model", "tiny-random", "--prompt", "a red dog on a green sofa", "--segmentor", segmentor]
    main(argv + ["--steps", "3", "--width", "192", "--out", str(out), "--maps", str(maps), "--scheduler", "ddim"])
    assert Image.open(out).size == (192, 128)
    picture = Image.open(maps)
    picture.verify()
    assert picture.size[0] > picture.size[1] > 100


def test_maps_without_segmentation_is_an_error(tmp_path):
    argv = ["generate", "--model", "tiny-random", "--prompt", "x", "--segmentor", "none", "--steps", "1"]
    with pytest.raises(SystemExit):
        main(argv + ["--out", str(tmp_path / "a.png"), "--maps", str(tmp_path / "m.png")])
    assert (tmp_path / "a.png").exists() and not (tmp_path / "m.png").exists()


def test_token_labels_name_pads_apart_from_eos():
    from goca_scfg.viz import token_label

    tokens = ["<|startoftext|>", "red</w>", "dog</w>", "<|endoftext|>", "<|endoftext|>"]
    assert [token_label(tokens, i) for i in range(5)] == ["<sos>", "red", "dog", "<eos>", "<pad 4>"]
