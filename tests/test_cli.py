"""`goca-scfg generate` end to end on the tiny offline model, and every bad input refused before any work."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from goca_scfg.cli import CLIError, main

ROOT = Path(__file__).resolve().parents[1]
GOOD = ["--model", "tiny-random", "--prompt", "a red dog on a green sofa", "--steps", "2", "--width", "64"]


@pytest.mark.parametrize("segmentor", ["goca", "scfg"])
def test_generate_writes_image_and_maps(tmp_path, segmentor):
    out, maps = tmp_path / "img.png", tmp_path / "maps.jpg"
    argv = ["generate", "--model", "tiny-random", "--prompt", "a red dog on a green sofa", "--segmentor", segmentor]
    main(argv + ["--steps", "3", "--width", "192", "--out", str(out), "--maps", str(maps), "--scheduler", "ddim"])
    assert Image.open(out).size == (192, 128)
    picture = Image.open(maps)
    assert picture.format == "JPEG"
    assert picture.size[0] > picture.size[1] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png", "maps.jpg"]  # no temporary files left


def _refused(capsys, argv, folder, needle):
    """Run the CLI; it must exit 2 with one stderr line `error: …` containing `needle`, and write nothing."""
    before = sorted(folder.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert exit_info.value.code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert needle in lines[0], lines[0]
    assert captured.out == ""
    assert sorted(folder.rglob("*")) == before


BAD = {
    # name: (extra argv with {d} = a writable empty folder, words the error line must contain)
    "out-equals-maps": (["--out", "{d}/x.png", "--maps", "{d}/x.png"], "same file"),
    "out-equals-maps-spelled-apart": (["--out", "{d}/x.png", "--maps", "{d}/./sub/../x.png"], "same file"),
    "out-missing-folder": (["--out", "{d}/missing/x.png"], "does not exist"),
    "out-not-an-image": (["--out", "{d}/x.txt"], ".txt"),
    "out-no-extension": (["--out", "{d}/x"], "no extension"),
    "out-is-a-folder": (["--out", "{d}"], "is a folder"),
    "maps-not-an-image": (["--out", "{d}/x.png", "--maps", "{d}/m.csv"], "--maps"),
    "maps-missing-folder": (["--out", "{d}/x.png", "--maps", "{d}/nope/m.png"], "does not exist"),
    "maps-without-segmentation": (["--out", "{d}/x.png", "--maps", "{d}/m.png", "--segmentor", "none"], "--maps"),
    "maps-without-guidance": (["--out", "{d}/x.png", "--maps", "{d}/m.png", "--guidance-scale", "1"], "--maps"),
    "steps-zero": (["--out", "{d}/x.png", "--steps", "0"], "--steps"),
    "steps-negative": (["--out", "{d}/x.png", "--steps", "-1"], "--steps"),
    "steps-fraction": (["--out", "{d}/x.png", "--steps", "2.5"], "--steps"),
    "guidance-nan": (["--out", "{d}/x.png", "--guidance-scale", "nan"], "--guidance-scale"),
    "guidance-inf": (["--out", "{d}/x.png", "--guidance-scale", "inf"], "--guidance-scale"),
    "height-zero": (["--out", "{d}/x.png", "--height", "0"], "--height"),
    "height-not-multiple": (["--out", "{d}/x.png", "--height", "65"], "multiple of 8"),
    "height-huge": (["--out", "{d}/x.png", "--height", "99968"], "4096"),
    "width-negative": (["--out", "{d}/x.png", "--width", "-8"], "--width"),
    "width-text": (["--out", "{d}/x.png", "--width", "wide"], "--width"),
    "seed-negative": (["--out", "{d}/x.png", "--seed", "-1"], "--seed"),
    "unknown-segmentor": (["--out", "{d}/x.png", "--segmentor", "magic"], "--segmentor"),
    "unknown-scheduler": (["--out", "{d}/x.png", "--scheduler", "euler"], "--scheduler"),
    "bad-device": (["--out", "{d}/x.png", "--device", "toaster"], "--device"),
    "undecodable-prompt": (["--out", "{d}/x.png", "--prompt", "a \udcff dog"], "--prompt"),
    "missing-model-path": (["--out", "{d}/x.png", "--model", "{d}/no-such-model"], "no such folder"),
    "model-folder-without-index": (["--out", "{d}/x.png", "--model", "{d}"], "model_index.json"),
    "hub-id-offline": (["--out", "{d}/x.png", "--model", "nobody/no-such-model"], "HF_HUB_OFFLINE"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch, case):
    extra, needle = BAD[case]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "sub").mkdir()
    argv = ["generate", *GOOD, *[a.format(d=tmp_path) for a in extra]]
    _refused(capsys, argv, tmp_path, needle)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        _refused(capsys, ["generate", *GOOD, "--out", str(folder / "x.png")], tmp_path, "permission")
    finally:
        folder.chmod(0o755)


def test_debug_shows_the_error_itself(tmp_path):
    with pytest.raises(CLIError, match="does not exist"):
        main(["--debug", "generate", *GOOD, "--out", str(tmp_path / "missing" / "x.png")])
    with pytest.raises(CLIError, match="does not exist"):
        main(["generate", "--debug", *GOOD, "--out", str(tmp_path / "missing" / "x.png")])


def _python(code_or_args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *code_or_args], capture_output=True, env=env, cwd=ROOT, **kwargs)


def test_help_and_usage_errors_import_neither_torch_nor_diffusers():
    code = (
        "import sys\n"
        "import goca_scfg.cli as cli\n"
        "for argv in (['--help'], ['generate', '--help'], ['generate', '--model', 'm', '--prompt', 'p',"
        " '--out', 'x.png', '--steps', '0']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(cli.__file__, sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    done = _python(["-c", code], timeout=60, text=True)
    assert done.returncode == 0, done.stderr
    assert "4096" in done.stdout  # the documented size bound is in --help
    path, loaded = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert Path(path).is_relative_to(ROOT) and loaded == "[]", done.stdout


def test_public_names_still_import_from_the_package():
    code = (
        "import goca_scfg\n"
        "from goca_scfg import *\n"
        "assert sorted(goca_scfg.__all__) == sorted(goca_scfg._PUBLIC), 'public names listed twice, differently'\n"
        "assert all(name in dir(goca_scfg) for name in goca_scfg.__all__)\n"
        "print(StableDiffusionSCFGPipeline.__module__, GoCAConfig.__name__)\n"
    )
    done = _python(["-c", code], timeout=120, text=True)
    assert done.returncode == 0 and done.stdout.split() == ["goca_scfg.pipeline", "GoCAConfig"], done.stderr


def test_non_utf8_argv_bytes_are_refused(tmp_path):
    argv = ["-m", "goca_scfg.cli", "generate", *GOOD[:2], "--prompt", b"a \xff dog", "--out", str(tmp_path / "x.png")]
    done = _python(argv, timeout=60)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "--prompt" in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == []


def test_token_labels_name_pads_apart_from_eos():
    from goca_scfg.viz import token_label

    tokens = ["<|startoftext|>", "red</w>", "dog</w>", "<|endoftext|>", "<|endoftext|>"]
    assert [token_label(tokens, i) for i in range(5)] == ["<sos>", "red", "dog", "<eos>", "<pad 4>"]
    t5 = ["▁a", "▁corgi", "▁", "s", "</s>", "<pad>"]
    assert [token_label(t5, i) for i in range(6)] == ["a", "corgi", "▁", "s", "</s>", "<pad>"]


def test_a_tiny_model_that_fails_to_build_says_why(monkeypatch):
    """Tiny models are built in code, never looked up in the hub cache: their OSError is reported as it is, not as
    "not in the local Hugging Face cache"."""
    from goca_scfg import cli, loading

    def broken(*_args, **_kwargs):
        raise FileNotFoundError("goca_scfg/data/t5_unigram_vocab.json")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "load_pipeline", broken)
    with pytest.raises(cli.CLIError, match="tiny-random-pixart: cannot be loaded: goca_scfg/data/t5_unigram_vocab"):
        cli._load("tiny-random-pixart", None, "cpu")
