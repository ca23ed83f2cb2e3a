"""Caption sets (algorithm.md §3.1, §6 item 23): the vendored COCO-30k CSV, subsets, and CSV round trips."""

from __future__ import annotations

import pytest

from eval.captions import DEFAULT_CAPTIONS, Caption, format_captions, load_captions, parse_captions, select_captions


@pytest.fixture(scope="module")
def coco() -> tuple[Caption, ...]:
    return load_captions()


def test_vendored_set_has_30k_unique_ids_and_multiline_captions(coco):
    assert DEFAULT_CAPTIONS.is_file()
    assert len(coco) == 30_000
    assert len({c.image_id for c in coco}) == 30_000
    assert sum("\n" in c.text for c in coco) == 97  # algorithm.md §3.1: quoted fields with embedded newlines
    assert sum(c.text != c.text.strip() for c in coco) == 3_463  # kept unstripped, as the reference passes them
    assert coco[0] == Caption(521669, "Someone is holding a phone while watching a video on it.")
    assert min(c.image_id for c in coco) == 42 and max(c.image_id for c in coco) == 581913


def test_limit_takes_the_first_captions_in_file_order(coco):
    assert select_captions(coco, 6) == coco[:6]
    assert select_captions(coco) == coco


def test_seeded_subset_is_reproducible_and_in_file_order(coco):
    a = select_captions(coco, 50, subset_seed=1)
    assert a == select_captions(coco, 50, subset_seed=1)
    assert a != select_captions(coco, 50, subset_seed=2)
    position = {c.image_id: i for i, c in enumerate(coco)}
    assert [position[c.image_id] for c in a] == sorted(position[c.image_id] for c in a)
    assert len(set(a)) == 50


def test_format_then_parse_round_trips_newlines_quotes_and_whitespace():
    captions = (Caption(1, "  two\nlines, with a comma "), Caption(22, 'a "quoted" word'), Caption(3, "plain"))
    assert parse_captions(format_captions(captions)) == captions


def test_user_csv_file(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text('image_id,text\n7,"a red\ncar"\n8,a blue bus\n', encoding="utf-8")
    assert load_captions(path) == (Caption(7, "a red\ncar"), Caption(8, "a blue bus"))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("id,caption\n1,a\n", "expected the header"),
        ("image_id,text\n1,a\n1,b\n", "appears twice"),
        ("image_id,text\nx,a\n", "not an integer"),
        ("image_id,text\n1,a,extra\n", "3 fields"),
        ("image_id,text\n", "no captions"),
    ],
)
def test_bad_csv_raises(text, match):
    with pytest.raises(ValueError, match=match):
        parse_captions(text)


def test_bad_subset_arguments(coco):
    with pytest.raises(ValueError, match="exceeds"):
        select_captions(coco[:3], 4)
    with pytest.raises(ValueError, match=">= 1"):
        select_captions(coco, 0)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_captions("nope.csv")
