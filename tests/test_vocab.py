"""The one vocabulary of method, scheduler and dtype names, and that the CLI and the benchmark read it."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from goca_scfg.config import GoCAConfig, SCFGConfig
from goca_scfg.loading import swap_scheduler
from goca_scfg.testing import make_scheduler
from goca_scfg.vocab import (
    BASELINE,
    DTYPE_NAMES,
    METHOD_ALIASES,
    METHOD_NAMES,
    METHODS,
    SCHEDULER_NAMES,
    check_scheduler,
    get_method,
    method_label,
    method_rank,
    resolve_dtype_name,
    torch_dtype,
)

ROOT = Path(__file__).resolve().parents[1]


def test_methods_are_unique_and_map_to_the_intended_configs():
    assert len(set(METHOD_NAMES)) == len(METHODS) and METHOD_NAMES[0] == BASELINE
    assert get_method("cfg").pipeline_kwargs() == {"segmentor": None, "scfg_config": None, "goca_config": None}
    assert get_method("none") == get_method("cfg") and set(METHOD_ALIASES.values()) <= set(METHOD_NAMES)
    assert get_method("scfg").scfg_config == SCFGConfig() and get_method("scfg-paper").scfg_config.ssgc == "paper"
    assert get_method("goca").goca_config == GoCAConfig() and get_method("goca").segmentor == "goca"
    assert get_method("goca-vanilla").goca_config == GoCAConfig(head="average", layer="average", rescale="none")
    assert get_method("goca-paper").goca_config.tokens == "content"
    assert not get_method("goca-fast").goca_config.is_exact()
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        get_method("magic")


def test_labels_and_table_order():
    assert method_label("goca") == "GoCA+S-CFG" and method_label("cfg") == "CFG" and method_label("x") == "x"
    ranked = sorted(["zzz", "goca", "goca-vanilla", "cfg", "scfg", "aaa"], key=method_rank)
    assert ranked == ["cfg", "scfg", "goca-vanilla", "goca", "aaa", "zzz"]


def test_every_scheduler_name_applies():
    assert check_scheduler("ddim") == "ddim"
    with pytest.raises(ValueError, match="euler"):
        check_scheduler("euler")
    for name in SCHEDULER_NAMES:
        pipe = SimpleNamespace(scheduler=make_scheduler("pndm"))
        swap_scheduler(pipe, name)
        expected = {"default": "PNDM", "pndm": "PNDM", "ddim": "DDIM", "dpm++": "DPMSolverMultistep"}[name]
        assert type(pipe.scheduler).__name__.startswith(expected), name


def test_dtype_names():
    assert [torch_dtype(n) for n in DTYPE_NAMES] == [torch.float16, torch.bfloat16, torch.float32]
    assert resolve_dtype_name("auto", "cuda") == "fp16" and resolve_dtype_name("auto", "cpu") == "fp32"
    assert torch_dtype("auto", "cuda") == torch.float16
    with pytest.raises(ValueError, match="fp64"):
        resolve_dtype_name("fp64", "cpu")


@pytest.mark.parametrize("path", ["goca_scfg/cli.py", "bench/bench_guidance.py"])
def test_cli_and_bench_define_no_name_tables_of_their_own(path):
    text = (ROOT / path).read_text()
    assert not re.search(r"torch\.(float16|bfloat16)", text), "dtype table written out again"
    assert not re.search(r"""["']dpm\+\+["']""", text), "scheduler names written out again"
    assert not re.search(r"""["']goca-vanilla["']\s*[:,]""", text), "method table written out again"
