"""Every citation in the code resolves inside the repository: docs/algorithm.md sections exist, no outside notes."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTES = ROOT / "docs" / "algorithm.md"
FOLDERS = ("goca_scfg", "eval", "bench", "tests")
SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".sh"}

# Documents that live outside the repository, and issue-tracker references. Written split so that this file
# does not match its own list.
OUTSIDE = [
    re.compile("ALGORITHM" + r"(\.md)?\s*§"),
    re.compile("ALGORITHM" + r"\.md"),
    re.compile("STYLE" + r"\.md"),
    re.compile("ENVIRONMENT" + r"\.md"),
    re.compile("shared" + "/"),
    re.compile("issue" + r"\s+item", re.IGNORECASE),
    re.compile("issue" + r"\s*#", re.IGNORECASE),
]
SECTION = r"\d+(?:\.\d+)*"
HEADING = re.compile(rf"^#{{1,6}}\s+§?({SECTION})\.?\s")
ITEM = re.compile(r"^(\d+)\.\s")
CITED = re.compile(rf"§\s*({SECTION})(?:\s*[–-]\s*({SECTION}))?(?:\s+items?\s+(\d+)\b)?")


def notes_sections(text: str) -> set[str]:
    """Section numbers of the notes: numbered headings, plus 'X.N' for item N of a numbered list under heading X."""
    found, top = set(), None
    for line in text.splitlines():
        head = HEADING.match(line)
        if head:
            found.add(head.group(1))
            top = head.group(1) if "." not in head.group(1) else None
            continue
        item = ITEM.match(line)
        if item and top is not None:
            found.add(f"{top}.{item.group(1)}")
    return found


def outside_citations(text: str) -> list[str]:
    """Lines of `text` that cite a document outside the repository or an issue."""
    return [line.strip() for line in text.splitlines() if any(p.search(line) for p in OUTSIDE)]


def cited_sections(text: str) -> set[str]:
    """Every section named on a line that cites algorithm.md: '§1.4', both ends of '§2.5–2.7', '§6 item 20' → 6.20."""
    cited = set()
    for line in text.splitlines():
        if "algorithm.md" not in line:
            continue
        for first, last, item in CITED.findall(line):
            cited.add(first)
            if last:
                cited.add(last)
            if item:
                cited.add(f"{first}.{item}")
    return cited


def _files():
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                yield path


def test_notes_have_the_cited_numbering():
    sections = notes_sections(NOTES.read_text(encoding="utf-8"))
    expected = {"0", "0.1", "1", "1.3", "1.6", "2.3", "2.10", "3.4", "4.3", "5", "5.1", "5.27", "6.1", "6.23", "8"}
    assert expected <= sections, sorted(expected - sections)
    assert "5.28" not in sections and "6.24" not in sections and "1.7" not in sections


def test_helpers_catch_what_they_are_meant_to():
    assert outside_citations('"""x (' + "ALGORITHM" + ' §1.4)"""\nok = 1') == ['"""x (' + "ALGORITHM" + ' §1.4)"""']
    assert outside_citations("see " + "Issue" + " #10") and not outside_citations("(algorithm.md §1.4)")
    assert cited_sections("(algorithm.md §2.5–2.7, §6 item 20; §5.10)") == {"2.5", "2.7", "6", "6.20", "5.10"}
    assert notes_sections("## 5. Odd\n1. a\n2. b\n### 5.3 c\n1. step") == {"5", "5.1", "5.2", "5.3"}


def test_no_file_cites_a_document_outside_the_repository():
    bad = [f"{p.relative_to(ROOT)}: {line}" for p in _files() for line in outside_citations(p.read_text("utf-8"))]
    assert not bad, "\n".join(bad)


def test_every_cited_section_exists():
    sections = notes_sections(NOTES.read_text(encoding="utf-8"))
    missing = [
        f"{p.relative_to(ROOT)}: §{s}"
        for p in _files()
        for s in sorted(cited_sections(p.read_text("utf-8")))
        if s not in sections
    ]
    assert not missing, "\n".join(missing)
