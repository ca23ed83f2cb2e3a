"""The wheel built from the repository installs no top-level `eval`, carries every module, and its scripts run."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "goca-scfg": "goca_scfg.cli:main",
    "goca-scfg-sweep": "goca_scfg_eval.sweep:main",
    "goca-scfg-metrics": "goca_scfg_eval.metrics:main",
    "goca-scfg-report": "goca_scfg_eval.report:main",
}
INSTALLED_AS = {"goca_scfg": "goca_scfg", "eval": "goca_scfg_eval"}  # repository folder → installed package


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel offline from a clean copy of the sources (no build/ or egg-info left in the repository)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in INSTALLED_AS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    done = subprocess.run([*command, "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr  # e.g. the deprecated licence table, a package left out
    (built,) = (tmp / "dist").glob("*.whl")
    return built


def test_wheel_has_no_top_level_eval_and_every_module(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "eval" not in tops and not any(n.startswith("eval") for n in names)
    assert tops == {"goca_scfg", "goca_scfg_eval", next(t for t in tops if t.endswith(".dist-info"))}
    expected = {
        f"{INSTALLED_AS[folder]}/{p.relative_to(ROOT / folder).as_posix()}"
        for folder in INSTALLED_AS
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and p.suffix in {".py", ".csv", ".md", ".json"} and "__pycache__" not in p.parts
    }
    assert expected - set(names) == set()
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata


def test_console_scripts_of_the_wheel_import_and_answer_help(wheel, tmp_path):
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)  # a pure-Python wheel installs by unpacking it
    code = f"""
import importlib.metadata as md, json, sys
sys.path.insert(0, {str(target)!r})
(dist,) = [d for d in md.distributions(path=[{str(target)!r}]) if d.metadata["Name"] == "goca-scfg"]
result = {{}}
for ep in dist.entry_points.select(group="console_scripts"):
    main = ep.load()
    try:
        main(["--help"])
        code = None
    except SystemExit as exit:
        code = exit.code
    result[ep.name] = [ep.value, code, sys.modules[main.__module__].__file__]
print(json.dumps(result))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    # -I: no PYTHONPATH, no user site, no current folder; the venv's editable install stays on sys.path but the
    # unpacked wheel comes first, and the assertion below checks where each module was imported from.
    done = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {name: value for name, (value, _, _) in result.items()} == SCRIPTS
    for name, (_, code, file) in result.items():
        assert code in (0, None), (name, code)
        assert Path(file).is_relative_to(target), (name, file)


@pytest.mark.slow
def test_tiny_models_generate_from_the_wheel_installed_into_a_fresh_venv(wheel, tmp_path):
    """`goca-scfg generate --model tiny-random*` from a non-editable install: the repository is not importable and no
    file of it outside the dependencies' venv is opened (the offline T5 vocabulary reads goca_scfg/data)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    command = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q"]
    done = subprocess.run([*command, str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (venv / "bin" / "goca-scfg").is_file()
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([python, "-c", purelib], text=True, timeout=60).strip())
    # The dependencies come from this venv as a plain path: its .pth files (the editable install's finder) stay unread.
    deps = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (site / "zz_dependencies.pth").write_text("".join(f"{d}\n" for d in deps))
    allowed = [str(Path(d).resolve()) for d in deps]
    code = f"""
import importlib.metadata as md, json, os, sys
from pathlib import Path

root, allowed, opened = {str(ROOT)!r}, {allowed!r}, set()

def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)):
        path = os.path.realpath(os.fsdecode(args[0]))
        if path.startswith(root + os.sep) and not any(path.startswith(a + os.sep) for a in allowed):
            opened.add(path)

sys.addaudithook(hook)
(script,) = [ep for ep in md.distribution("goca-scfg").entry_points if ep.name == "goca-scfg"]
main = script.load()
for model in ("tiny-random", "tiny-random-xl", "tiny-random-pixart"):
    main(["generate", "--model", model, "--prompt", "a cat on 2 sofas", "--steps", "2", "--height", "64",
          "--width", "64", "--device", "cpu", "--out", model + ".png"])
import goca_scfg, goca_scfg.testing
print(json.dumps({{"file": goca_scfg.__file__, "dist": str(md.distribution("goca-scfg").locate_file("")),
                   "opened": sorted(opened), "path": [p for p in sys.path if p.startswith(root)]}}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).resolve().is_relative_to(site.resolve()), result["file"]
    assert Path(result["dist"]).resolve().is_relative_to(site.resolve()), result["dist"]
    assert result["opened"] == [], result["opened"]
    assert set(result["path"]) <= set(deps), result["path"]
    for model in ("tiny-random", "tiny-random-xl", "tiny-random-pixart"):
        assert (tmp_path / f"{model}.png").stat().st_size > 0, model


def test_python_m_eval_works_from_the_repository_root():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-m", "eval.report", "--help"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert done.returncode == 0 and "usage" in done.stdout, done.stderr
