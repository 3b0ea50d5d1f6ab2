"""Annotation readers and presets, on small annotation files and empty stand-in video files.

The readers only check that video files exist (they never decode), so zero-byte files named
like videos are enough here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from retrieval.data.corpora import PRESETS, Corpus, CorpusItem, clean_caption, load_corpus


def touch_videos(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_msrvtt_single_captions_and_text_queries(tmp_path: Path) -> None:
    touch_videos(tmp_path, "video7020.mp4", "video7021.mp4")
    ann = write_json(
        tmp_path / "msrvtt_ret_test1k.json",
        [
            {"video": "video7020.mp4", "caption": "a woman creating a fondant baby"},
            {"video": "video7021.mp4", "caption": "a family talking"},
        ],
    )
    corpus = load_corpus("msrvtt", ann, tmp_path)
    assert isinstance(corpus, Corpus) and corpus.name == "msrvtt"
    assert corpus.max_text_len == 32 and corpus.sample == "middle" and corpus.max_seconds is None
    assert [item.captions for item in corpus.items] == [
        ["a woman creating a fondant baby"],
        ["a family talking"],
    ]
    assert corpus.texts() == [("a woman creating a fondant baby", 0), ("a family talking", 1)]
    assert corpus.paths() == [tmp_path / "video7020.mp4", tmp_path / "video7021.mp4"]
    assert corpus.missing == []


def test_didemo_joins_caption_list_into_one_paragraph_of_the_first_30s(tmp_path: Path) -> None:
    touch_videos(tmp_path, "a.mp4")
    ann = write_json(tmp_path / "didemo.json", [{"video": "a.mp4", "caption": ["a dog runs", " it jumps "]}])
    corpus = load_corpus("didemo", ann, tmp_path)
    assert corpus.items[0].captions == ["a dog runs it jumps"]
    assert corpus.texts() == [("a dog runs it jumps", 0)]
    assert (corpus.max_text_len, corpus.max_seconds) == (64, 30.0)


def test_anet_paragraph_and_lsmdc_lengths() -> None:
    assert PRESETS["anet"].join_captions and PRESETS["anet"].max_text_len == 150
    assert not PRESETS["lsmdc"].join_captions and PRESETS["lsmdc"].max_text_len == 96
    assert PRESETS["generic"].max_text_len == 64


def test_msvd_keeps_every_caption_as_a_separate_query(tmp_path: Path) -> None:
    touch_videos(tmp_path, "v0.avi", "v1.avi")
    ann = write_json(
        tmp_path / "msvd.json",
        [
            {"video": "v0.avi", "caption": ["a cat", "a kitten plays"]},
            {"video": "v1.avi", "caption": ["a car"]},
        ],
    )
    corpus = load_corpus("msvd", ann, tmp_path)
    assert corpus.texts() == [("a cat", 0), ("a kitten plays", 0), ("a car", 1)]


def test_optional_fields_and_extras_are_kept(tmp_path: Path) -> None:
    touch_videos(tmp_path, "clips/x.mp4")
    ann = write_json(
        tmp_path / "ann.json",
        [{"video": "clips/x.mp4", "caption": "a jump", "label": "jumping", "start": 1, "end": 2.5, "id": 17}],
    )
    item = load_corpus("generic", ann, tmp_path).items[0]
    assert item == CorpusItem(
        video="clips/x.mp4", captions=["a jump"], label="jumping", start=1.0, end=2.5, extra={"id": 17}
    )
    corpus = load_corpus("generic", ann, tmp_path)
    assert corpus.window(0) == (1.0, 2.5)


def test_csv_and_jsonl_annotations(tmp_path: Path) -> None:
    touch_videos(tmp_path, "a.mp4", "b.mp4")
    (tmp_path / "ann.csv").write_text('video,caption,label\na.mp4,"one, two",wave\nb.mp4,three,\n')
    corpus = load_corpus("generic", tmp_path / "ann.csv", tmp_path)
    assert [(i.video, i.captions, i.label) for i in corpus.items] == [
        ("a.mp4", ["one, two"], "wave"),
        ("b.mp4", ["three"], None),
    ]
    (tmp_path / "ann.jsonl").write_text(
        '{"video": "a.mp4", "caption": ["x", "y"]}\n'
        "\n"  # blank lines are skipped
        '{"video": "b.mp4", "caption": "z", "start": 0, "end": 1}\n'
    )
    corpus = load_corpus("generic", tmp_path / "ann.jsonl", tmp_path)
    assert corpus.texts() == [("x", 0), ("y", 0), ("z", 1)]
    assert corpus.window(0) is None and corpus.window(1) == (0.0, 1.0)


def test_folder_mode_lists_videos_recursively_without_captions(tmp_path: Path) -> None:
    touch_videos(tmp_path, "b/clip2.MP4", "a.webm", "b/c/clip3.mkv")
    (tmp_path / "notes.txt").write_text("not a video")
    corpus = load_corpus("generic", None, tmp_path)
    assert [item.video for item in corpus.items] == ["a.webm", "b/c/clip3.mkv", "b/clip2.MP4"]
    assert all(item.captions == [] for item in corpus.items)
    assert corpus.texts() == []


def test_folder_mode_without_videos_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no video files"):
        load_corpus("generic", None, tmp_path)
    with pytest.raises(FileNotFoundError, match="videos folder not found"):
        load_corpus("generic", None, tmp_path / "nowhere")


def test_missing_videos_are_listed_and_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    touch_videos(tmp_path, "here.mp4")
    ann = write_json(
        tmp_path / "ann.json",
        [{"video": "gone.mp4", "caption": "a"}, {"video": "here.mp4", "caption": "b"}],
    )
    with caplog.at_level(logging.WARNING, logger="retrieval.data.corpora"):
        corpus = load_corpus("msrvtt", ann, tmp_path)
    assert [item.video for item in corpus.items] == ["here.mp4"]
    assert corpus.missing == ["gone.mp4"]
    assert "1 of 2 videos" in caplog.text and "gone.mp4" in caplog.text
    unchecked = load_corpus("msrvtt", ann, tmp_path, check_files=False)
    assert len(unchecked.items) == 2 and unchecked.missing == []


def test_all_videos_missing_names_the_root_and_an_example(tmp_path: Path) -> None:
    ann = write_json(tmp_path / "ann.json", [{"video": "v/a.mp4", "caption": "a"}])
    videos_root = tmp_path / "wrong_folder"
    with pytest.raises(FileNotFoundError) as caught:
        load_corpus("msrvtt", ann, videos_root)
    message = str(caught.value)
    assert str(videos_root) in message and "--videos" in message
    assert str(videos_root / "v" / "a.mp4") in message


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"video": "a.mp4", "caption": "x"}, "expected a JSON list"),
        ([{"video": "a.mp4", "caption": "x"}, {"caption": "no video"}], "entry 1 .*'video' and 'caption'"),
        ([{"video": "a.mp4"}], 'entry 0 .*"caption" \\(string or list'),
        ([{"video": "a.mp4", "caption": "  "}], "entry 0 \\(a.mp4\\) has an empty caption"),
        ([{"video": "a.mp4", "caption": []}], "entry 0: 'caption' must be"),
        ([{"video": "a.mp4", "caption": "x", "start": 3}], "entry 0: 'start' and 'end'"),
        (
            [{"video": "a.mp4", "caption": "x", "start": "soon", "end": 4}],
            "entry 0: 'start' must be a number",
        ),
    ],
    ids=["not-a-list", "no-video", "no-caption", "empty-caption", "empty-list", "start-only", "bad-start"],
)
def test_malformed_annotations_are_value_errors(tmp_path: Path, data: object, pattern: str) -> None:
    touch_videos(tmp_path, "a.mp4")
    with pytest.raises(ValueError, match=pattern):
        load_corpus("generic", write_json(tmp_path / "ann.json", data), tmp_path)


def test_csv_without_caption_column_names_expected_fields(tmp_path: Path) -> None:
    (tmp_path / "ann.csv").write_text("path,text\na.mp4,hello\n")
    with pytest.raises(ValueError, match='expected fields: "video"'):
        load_corpus("generic", tmp_path / "ann.csv", tmp_path)


def test_missing_annotation_file_and_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_corpus("msrvtt", tmp_path / "nope.json", tmp_path)
    with pytest.raises(KeyError, match="unknown dataset 'youcook'"):
        load_corpus("youcook", None, tmp_path)


@pytest.mark.parametrize(
    ("raw", "umt", "strip_punctuation"),
    [
        ("A Man, playing GUITAR!", "a man playing guitar", "a man playing guitar"),
        ("hand-held  camera/phone", "hand held camera phone", "hand held camera phone"),
        ('  the man\'s "best" (ever)...  \n', "the mans best ever", "the mans best ever"),
        ("<person> walks in.", "person walks in", "person walks in"),
        ("Don’t  stop — [now] & 5%", "don’t stop — [now] & 5%", "dont stop now 5"),
    ],
)
def test_clean_caption(raw: str, umt: str, strip_punctuation: str) -> None:
    assert clean_caption(raw) == clean_caption(raw, "umt") == umt
    assert clean_caption(raw, "strip_punctuation") == strip_punctuation
    with pytest.raises(ValueError, match="unknown caption cleaning 'clip'"):
        clean_caption(raw, "clip")


@pytest.mark.parametrize("end", ["Infinity", "NaN", "1e999"])
def test_a_moment_that_never_ends_names_the_file_and_the_entry(tmp_path: Path, end: str) -> None:
    touch_videos(tmp_path, "a.mp4")
    ann = tmp_path / "moments.json"
    ann.write_text('[{"video": "a.mp4", "caption": "x", "start": 0, "end": 2},'
                   f' {{"video": "a.mp4", "caption": "y", "start": 0, "end": {end}}}]')
    with pytest.raises(ValueError, match=r"moments\.json: entry 1: 'end' must be a finite number of seconds"):
        load_corpus("generic", ann, tmp_path)
    csv_file = tmp_path / "moments.csv"
    csv_file.write_text("video,caption,start,end\na.mp4,x,0,inf\n")
    with pytest.raises(ValueError, match=r"moments\.csv: entry 0: 'end' must be a finite number"):
        load_corpus("generic", csv_file, tmp_path)


def test_huge_captions_are_cut_when_read_with_one_warning(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from retrieval.data.corpora import MAX_CAPTION_CHARS

    touch_videos(tmp_path, "a.mp4", "b.mp4")
    huge = "a red circle moving up " * 400_000   # 9.2 MB
    ann = write_json(tmp_path / "ann.json", [{"video": "a.mp4", "caption": [huge, "short"]},
                                             {"video": "b.mp4", "caption": huge}])
    with caplog.at_level(logging.WARNING):
        corpus = load_corpus("msvd", ann, tmp_path)
    assert [len(c) for c in corpus.items[0].captions] == [MAX_CAPTION_CHARS, 5]
    assert corpus.items[0].captions[0] == huge[:MAX_CAPTION_CHARS]
    assert len(corpus.items[1].captions[0]) == MAX_CAPTION_CHARS
    warnings = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    assert warnings == [f"2 caption(s) in {ann} are longer than {MAX_CAPTION_CHARS} characters and were cut there"]
    # an error message quotes a bad entry without its megabytes
    bad = write_json(tmp_path / "bad.json", [{"video": "a.mp4", "caption": huge, "start": "soon", "end": 1}])
    with pytest.raises(ValueError) as caught:
        load_corpus("msvd", bad, tmp_path)
    assert len(str(caught.value)) < 1000
