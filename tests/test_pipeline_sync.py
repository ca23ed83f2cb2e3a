"""The copied denoising loops stay diffusers' own: every line of our `__call__` equals the installed diffusers'
`__call__` except hunks that start with a line marked `# [S-CFG]` (docstrings aside), and no upstream line is
dropped. A newer diffusers that changes its loop makes this fail, so re-syncing is a diff, not a hunt."""

import ast
import difflib
import inspect
import textwrap

import diffusers
import pytest

from goca_scfg.families import FAMILIES

# every registered model family's pipeline against the diffusers pipeline it extends
PAIRS = [(family.pipeline_class(), getattr(diffusers, family.extends[0])) for family in FAMILIES]


def _code_lines(cls) -> list[str]:
    """`cls.__call__`'s source lines without decorators and without its docstring."""
    source = textwrap.dedent(inspect.getsource(cls.__call__))
    func = ast.parse(source).body[0]
    lines = source.splitlines()
    doc = func.body[0]
    drop = set(range(doc.lineno - 1, doc.end_lineno)) if isinstance(doc, ast.Expr) else set()
    drop |= set(range(func.lineno - 1 - len(func.decorator_list), func.lineno - 1))
    return [line for i, line in enumerate(lines) if i not in drop]


@pytest.mark.parametrize(("ours", "upstream"), PAIRS, ids=lambda c: c.__name__)
def test_loop_is_upstream_except_marked_hunks(ours, upstream):
    mine, theirs = _code_lines(ours), _code_lines(upstream)
    unmarked, dropped = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=theirs, b=mine, autojunk=False).get_opcodes():
        if tag == "delete":
            dropped += theirs[i1:i2]
        elif tag in ("insert", "replace") and "[S-CFG]" not in mine[j1]:
            unmarked += mine[j1:j2]
    assert not dropped, f"upstream lines missing from {ours.__name__}: {dropped}"
    assert not unmarked, f"changed lines of {ours.__name__} whose hunk is not marked # [S-CFG]: {unmarked}"
    assert sum("[S-CFG]" in line for line in mine) >= 8  # the marks exist (a vacuous diff cannot pass)
