"""The README's commands and Python example run, with the model id swapped for a saved tiny-random model."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
PIXART = "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
SD3 = "stabilityai/stable-diffusion-3.5-medium"
FLUX = "black-forest-labs/FLUX.1-dev"
INSTALL = "bash scripts/install.sh && "


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from goca_scfg.testing import tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-model")
    tiny_pipeline().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_pixart_dir(tmp_path_factory):
    from goca_scfg.testing import tiny_pixart_pipeline

    path = tmp_path_factory.mktemp("tiny-pixart")
    tiny_pixart_pipeline().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_mmdit_dirs(tmp_path_factory):
    from goca_scfg.testing import tiny_flux_pipeline, tiny_sd3_pipeline

    paths = {}
    for model, build in ((SD3, tiny_sd3_pipeline), (FLUX, tiny_flux_pipeline)):
        paths[model] = str(tmp_path_factory.mktemp("tiny-mmdit"))
        build().save_pretrained(paths[model])
    return paths


@pytest.fixture(scope="module")
def tiny_xl_dir(tmp_path_factory):
    from goca_scfg.testing import tiny_xl_pipeline

    path = tmp_path_factory.mktemp("tiny-xl")
    tiny_xl_pipeline().save_pretrained(path)
    return str(path)


def test_first_command_is_what_ci_runs():
    first, second = _blocks("bash")[0].strip().splitlines()[:2]
    assert first.startswith(INSTALL) and second.startswith(INSTALL)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/install.sh" in ci
    assert first[len(INSTALL) :] in ci


def test_main_command_runs(tiny_model_dir, tmp_path):
    second = _blocks("bash")[0].strip().splitlines()[1][len(INSTALL) :]
    command = second.replace(SD15, tiny_model_dir).replace(".venv/bin/goca-scfg", f"{sys.executable} -m goca_scfg.cli")
    command += " --steps 3"  # the command as written, on the tiny model, in fewer of its 50 default steps
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(command, shell=True, check=True, cwd=tmp_path, env=env, timeout=600)
    for name in ("corgi.png", "corgi_maps.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_python_examples_run(tiny_model_dir, tiny_xl_dir, tiny_pixart_dir, tiny_mmdit_dirs, tmp_path, monkeypatch):
    """Every Python block, in order, in one namespace (later blocks reuse `pipe`); Flux's 1024² at the tiny model's
    64² (the tiny transformer has no size of its own)."""
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for code in _blocks("python"):
        code = code.replace(SD15, tiny_model_dir).replace(SDXL, tiny_xl_dir).replace(PIXART, tiny_pixart_dir)
        code = code.replace(SD3, tiny_mmdit_dirs[SD3]).replace(FLUX, tiny_mmdit_dirs[FLUX])
        code = code.replace("height=1024, width=1024", "height=64, width=64")
        exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "corgi.png").exists() and (tmp_path / "corgi_maps.png").exists()
    assert len(namespace["labels"]["goca"]) == len(namespace["pipe"].scheduler.timesteps)


def test_evaluation_commands_parse_and_name_the_stats_file():
    """The README's `python -m eval.*` lines use flags the CLIs accept, and the stats file name is the one made."""
    import shlex

    from eval import metrics, sweep
    from eval.fid import FIDProtocol, stats_file_name

    lines = [
        line.split("#")[0].strip()
        for line in README.splitlines()
        if line.strip().startswith("python -m eval.") and not line.strip().startswith("python -m eval.report")
    ]
    assert len(lines) >= 3
    for line in lines:
        module, *argv = shlex.split(line)[2:]
        parser = {"eval.sweep": sweep.build_parser, "eval.metrics": metrics.build_parser}[module]()
        parser.parse_args(argv)
    expected = stats_file_name("coco-val2014", FIDProtocol("clean"), FIDProtocol("clean").network, 30000)
    assert expected in README
