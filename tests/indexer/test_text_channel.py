"""The text channel end to end: PP-OCR reads rendered titles while a job indexes them, the parts
carry the text, the index publishes it, and search fuses it with the clip vectors.

The corpus is three 2-second videos (one frame read each): a title, a sign, and no text.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from typer.testing import CliRunner

from app.cli import app
from indexer.export import export_index, read_export
from indexer.jobs import JobSpec, Shard, WorkDir, publish_job, run_index_job, work_dir_for
from indexer.search import Searcher
from indexer.store import open_index
from retrieval.ocr import OcrReader, read_span
from retrieval.sentence import unpack

pytest.importorskip("rapidocr_onnxruntime", reason="the ocr extra (make install installs it)")

FONT = ImageFont.load_default(size=30)
TEXTS = {"title.mp4": "CHAPTER 3", "sign.mp4": "OPEN 24 HOURS", "plain.mp4": None}


def _frame(text: str | None, width: int = 320, height: int = 96) -> np.ndarray:
    image = Image.new("RGB", (width, height), (20, 40, 70))
    if text:
        ImageDraw.Draw(image).text((16, 30), text, font=FONT, fill=(255, 255, 255))
    return np.asarray(image)


def _write_video(path: Path, text: str | None, seconds: float = 2.0, fps: int = 8, moving: bool = False) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 320, 96, "yuv420p"
        for n in range(int(seconds * fps)):
            frame = _frame(text)
            if moving:  # a square crossing the bottom of the frame, under the title
                frame = frame.copy()
                frame[72:92, 8 * n : 8 * n + 20] = (230, 120, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def reader() -> OcrReader:
    return OcrReader(threads=1)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("written")
    for name, text in TEXTS.items():
        _write_video(root / name, text)
    return root


@pytest.fixture(scope="module")
def text_index(model_dir: Path, videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("text-index") / "index"
    spec = JobSpec(model_dir=model_dir, out=out, videos=videos, part_size=2, channels=("visual", "text"))
    summary = run_index_job(spec, workers=0, batch_size=4, progress=False)
    assert (summary.indexed, summary.failed) == (3, 0)
    return out


def test_onnxruntime_uses_the_threads_it_was_given(reader: OcrReader) -> None:
    assert reader.onnx_threads == {"det": 1, "cls": 1, "rec": 1}


def test_opencv_coexists_with_the_video_decoders() -> None:
    for order in ("import cv2, decord, av", "import decord, av, cv2"):
        done = subprocess.run([sys.executable, "-c", order + "; import rapidocr_onnxruntime"], capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr


def test_reads_a_title_with_its_box(reader: OcrReader) -> None:
    lines = reader.read(_frame("CHAPTER 3"))
    assert [text.replace(" ", "") for text, _, _ in lines] == ["CHAPTER3"]
    (x0, y0), _, (x1, y1), _ = lines[0][1]
    assert 0 <= x0 < 60 and 20 <= y0 < 45 and 130 < x1 < 320 and 45 < y1 < 80
    assert reader.read(_frame(None)) == []


def test_huge_frames_are_scaled_down_and_boxes_map_back(reader: OcrReader) -> None:
    big = np.asarray(Image.fromarray(_frame("CHAPTER 3")).resize((3200, 960), Image.NEAREST))
    lines = reader.read(big)
    assert [text.replace(" ", "") for text, _, _ in lines] == ["CHAPTER3"]
    (x0, y0), _, (x1, _), _ = lines[0][1]
    assert x0 < 600 and 200 <= y0 < 450 and x1 > 1300, "boxes are in the frame's own pixels"


def test_a_failing_frame_is_a_note_not_an_error(reader: OcrReader, videos: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(frame: np.ndarray) -> list:
        raise RuntimeError("recogniser crashed")

    monkeypatch.setattr(reader, "detect", broken)
    reader.recent.clear()
    text = read_span(reader, videos / "title.mp4")
    assert text["lines"] == [] and "recogniser crashed" in text["notes"][0]
    missing = read_span(reader, videos / "nowhere.mp4")
    assert missing["frames"] == 0 and missing["notes"][0].startswith("cannot decode frames")


def test_user_models_from_a_directory(tmp_path: Path) -> None:
    import rapidocr_onnxruntime

    bundled = Path(rapidocr_onnxruntime.__file__).parent / "models"
    mine = tmp_path / "my-ocr"
    mine.mkdir()
    shutil.copy(bundled / "ch_PP-OCRv4_det_infer.onnx", mine / "latin_det.onnx")
    shutil.copy(bundled / "ch_PP-OCRv4_rec_infer.onnx", mine / "latin_rec.onnx")
    custom = OcrReader(mine, threads=1)
    assert custom.identity["models"]["rec"]["file"] == "latin_rec.onnx"
    assert custom.identity["model_dir"] == str(mine.resolve())
    assert [text.replace(" ", "") for text, _, _ in custom.read(_frame("OPEN 24"))] == ["OPEN24"]
    (mine / "latin_rec.onnx").unlink()
    with pytest.raises(ValueError, match="no rec model"):
        OcrReader(mine)
    with pytest.raises(FileNotFoundError):
        OcrReader(tmp_path / "absent")


def test_the_index_carries_text_lines_times_and_the_channels(text_index: Path) -> None:
    index = open_index(text_index)
    channels = index.manifest["extra"]["channels"]
    assert set(channels) == {"visual", "text"} and channels["text"]["every_s"] == 2.0
    assert "rapidocr-onnxruntime" in channels["text"]["engine"]
    by_name = {Path(item["path"]).name: item["extra"]["text"] for item in index.items}
    assert [line["text"].replace(" ", "") for line in by_name["title.mp4"]["lines"]] == ["CHAPTER3"]
    line = by_name["sign.mp4"]["lines"][0]
    assert line["text"].replace(" ", "") == "OPEN24HOURS" and 0.0 <= line["start"] <= line["end"] <= 2.0
    assert len(line["box"]) == 4
    assert by_name["plain.mp4"] == {"lines": [], "frames": 1, "notes": ["no text"]}
    # the semantic side: a sentence vector of each item's text, and the model that made it
    assert channels["text"]["semantic"] == {"model": "all-MiniLM-L6-v2", "dim": 384, "dtype": "float16"}
    assert unpack(by_name["title.mp4"]["vector"]).shape == (384,)


def test_sharded_parts_hold_the_text_and_merge_to_the_same_index(model_dir: Path, videos: Path,
                                                                 text_index: Path, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    spec = JobSpec(model_dir=model_dir, out=out, videos=videos, part_size=2, channels=("visual", "text"))
    run_index_job(spec, Shard(0, 2), workers=0, progress=False)
    work = WorkDir(work_dir_for(out))
    part = work.read_manifest(0)
    assert all("text" in item["extra"] for item in part["items"]), "the durable part holds the text"
    # resuming with another channel set is another job
    with pytest.raises(ValueError, match="channels"):
        run_index_job(replace(spec, channels=("visual",)), Shard(1, 2), resume=True, workers=0, progress=False)
    run_index_job(spec, Shard(1, 2), workers=0, progress=False)
    publish_job(out)
    texts = [item["extra"]["text"] for item in open_index(out).items]
    assert texts == [item["extra"]["text"] for item in open_index(text_index).items]


def test_search_fuses_the_text_channel(model_dir: Path, text_index: Path) -> None:
    searcher = Searcher(text_index)
    assert searcher.channels == ("visual", "text")
    hits = searcher.search("a blue frame under a title that reads chapter 3", k=3)
    assert Path(hits[0].path).name == "title.mp4"
    assert hits[0].channels["text"]["rank"] == 1 and hits[0].channels["visual"]["score"] is not None
    assert hits[0].text["snippet"].replace(" ", "") == "«CHAPTER3»"
    # no on-screen match: exactly the visual search, with its cosine scores
    picture = searcher.search("a dark blue background", k=3)
    assert [(h.item_id, h.score) for h in picture] == [
        (h.item_id, h.score) for h in searcher.search("a dark blue background", k=3, channels=["visual"])]
    with pytest.raises(ValueError, match="no sound channel"):
        searcher.search("chapter 3", channels=["sound"])


def test_semantic_side_finds_text_the_query_does_not_quote(text_index: Path) -> None:
    searcher = Searcher(text_index)
    assert len(searcher.semantic_index) == 2
    assert searcher.text_index.search("section three") == [], "no word in common"
    hit = searcher.search("section three", k=3)[0]
    assert Path(hit.path).name == "title.mp4"
    assert hit.channels["semantic"]["rank"] == 1 and "text" not in hit.channels
    assert hit.text["text"].replace(" ", "") == "CHAPTER3" and hit.text["spans"] == ()
    # weighed 0, the semantic side is off: nothing else matches, so the visual search comes back
    off = searcher.search("section three", k=3, weights={"semantic": 0})
    assert [(h.item_id, h.score) for h in off] == [
        (h.item_id, h.score) for h in searcher.search("section three", k=3, channels=["visual"])]


def test_a_filter_applies_to_every_fused_channel_and_exports_carry_the_text(text_index: Path,
                                                                            tmp_path: Path) -> None:
    searcher = Searcher(text_index)
    query = "a blue frame under a title that reads chapter 3"
    hits = searcher.search(query, k=3, where="path!=title.mp4")
    assert hits and all(Path(hit.path).name != "title.mp4" for hit in hits)  # the text match is filtered out
    assert [Path(h.path).name for h in searcher.search(query, k=3, where="path=title.mp4")] == ["title.mp4"]
    # the semantic side is filtered too
    assert all(Path(h.path).name != "title.mp4" for h in searcher.search("section three", k=3, where="path!=title.mp4"))
    vectors, table = read_export(export_index(text_index, tmp_path / "export"))
    texts = dict(zip(table.column("path").to_pylist(), table.column("screen_text").to_pylist(), strict=True))
    assert texts["title.mp4"].replace(" ", "") == "CHAPTER3" and texts["plain.mp4"] == ""
    assert len(vectors) == 3


def test_cli_search_json_carries_channels_and_the_matched_text(text_index: Path) -> None:
    result = CliRunner().invoke(app, ["search", "open 24 hours", "--index", str(text_index), "--json", "-k", "2",
                                      "--device", "cpu", "--weights", "visual=1,text=2"])
    assert result.exit_code == 0, result.output
    first = json.loads(result.output.splitlines()[0])
    assert Path(first["path"]).name == "sign.mp4"
    assert first["channels"]["text"]["rank"] == 1
    assert first["text"]["start"] <= first["text"]["end"] and "«" in first["text"]["snippet"]
    table = CliRunner().invoke(app, ["search", "open 24 hours", "--index", str(text_index), "--device", "cpu"])
    assert table.exit_code == 0 and "on screen at" in table.output


def test_cli_refuses_bad_channel_options_before_work(model_dir: Path, videos: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    base = ["index", "--model", str(model_dir), "--videos", str(videos), "--out", str(tmp_path / "i")]
    bad = runner.invoke(app, [*base, "--channels", "visual,smell"])
    assert bad.exit_code == 2 and "unknown channel 'smell'" in bad.output
    nodir = runner.invoke(app, [*base, "--channels", "visual,text", "--ocr", str(tmp_path / "absent")])
    assert nodir.exit_code == 2 and "absent" in nodir.output
    import indexer.channels
    import retrieval.ocr

    monkeypatch.setattr(retrieval.ocr, "ocr_available", lambda: False)
    monkeypatch.setattr(indexer.channels, "ocr_available", lambda: False)
    missing = runner.invoke(app, [*base, "--channels", "visual,text"])
    assert missing.exit_code == 2 and "vtr[ocr]" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    assert not (tmp_path / "i").exists() and not work_dir_for(tmp_path / "i").exists()


def test_index_add_reads_the_new_videos_text(model_dir: Path, videos: Path, tmp_path: Path) -> None:
    from indexer.update import add_to_index, remove_from_index

    corpus = tmp_path / "corpus"
    shutil.copytree(videos, corpus)
    index = tmp_path / "index"
    run_index_job(JobSpec(model_dir=model_dir, out=index, videos=corpus, part_size=2, channels=("visual", "text")),
                  workers=0, progress=False)
    _write_video(corpus / "sale.mp4", "SALE 50")
    add_to_index(index, corpus, workers=0, progress=False)
    reader = open_index(index)
    assert set(reader.manifest["extra"]["channels"]) == {"visual", "text"}
    added = next(item for item in reader.items if item["path"].endswith("sale.mp4"))
    assert [line["text"].replace(" ", "") for line in added["extra"]["text"]["lines"]] == ["SALE50"]
    assert unpack(added["extra"]["text"]["vector"]).shape == (384,)
    remove_from_index(index, [str(corpus / "title.mp4")])
    left = {Path(item["path"]).name for item in open_index(index).items}
    assert left == {"sign.mp4", "plain.mp4", "sale.mp4"}
    assert Searcher(index).search("sale 50", k=1)[0].path.endswith("sale.mp4")


def test_eval_reports_each_channel_and_the_fusion_per_query_kind(model_dir: Path, tmp_path: Path) -> None:
    from retrieval.data.synthetic import generate_corpus

    corpus = tmp_path / "corpus"
    generate_corpus(corpus, n_train=1, n_test=6, size=128, long_videos=0, progress=False, written_share=0.5)
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--dataset", "generic", "--ann",
                                      str(corpus / "test.json"), "--videos", str(corpus / "videos"), "--channels",
                                      "visual,text", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "text_mentioning" in result.output and "plain_fusion" in result.output
    metrics = json.loads((out / "channels.json").read_text())
    assert metrics["queries"] == {"all": 6, "picture_only": 3, "text_mentioning": 3, "speech_mentioning": 0}
    mentioning, picture = metrics["text_mentioning"], metrics["picture_only"]
    assert mentioning["text"]["R@1"] >= 66.0, "the untrained model cannot see; the text channel reads"
    assert mentioning["fused"]["R@1"] >= mentioning["visual"]["R@1"]
    assert picture["fused"] == picture["visual"], "no on-screen match: fusion is the visual ranking"
    assert open_index(out / "index").manifest["extra"]["channels"].keys() == {"visual", "text"}


def test_a_still_is_read_once_and_its_line_spans_the_samples(reader: OcrReader, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    still = _write_video(tmp_path / "still.mp4", "CHAPTER 3", seconds=4.0)
    calls = []
    real = reader.detect
    monkeypatch.setattr(reader, "detect", lambda frame: calls.append(1) or real(frame))
    text = read_span(reader, still, every_s=1.0)
    assert text["frames"] == 4 and len(calls) == 1
    (line,) = text["lines"]
    assert line["start"] < 1.0 and line["end"] > 3.0


def test_the_page_shows_the_matched_words_and_starts_the_preview_there(text_index: Path) -> None:
    from app.web import SearchPage

    page = SearchPage(Searcher(text_index))
    html, _ = page.search("a sign saying open 24 hours", 3)
    assert 'data-channel="text">text #1' in html and "<mark>" in html
    first = page.search_json("a sign saying open 24 hours", 3)["hits"][0]
    assert first["video_path"] == "sign.mp4" and first["channels"]["text"]["rank"] == 1
    assert first["url"].endswith(f"#t={first['text']['start']:.2f}")


def test_a_title_over_moving_pictures_is_detected_each_time_and_recognised_once(reader: OcrReader,
                                                                                tmp_path: Path) -> None:
    video = _write_video(tmp_path / "moving.mp4", "CHAPTER 3", seconds=4.0, moving=True)
    before = dict(reader.counts)
    text = read_span(reader, video, every_s=1.0)
    done = {key: reader.counts[key] - before[key] for key in before}
    assert text["frames"] == 4
    assert done["detected"] == 4, "the square moves: every sampled frame is a new picture"
    assert done["recognised"] == 1 and done["reused_boxes"] == 3, done
    (line,) = text["lines"]
    assert line["text"].replace(" ", "") == "CHAPTER3" and line["start"] < 1.0 and line["end"] > 3.0


def test_overlapping_windows_read_a_shared_frame_once(reader: OcrReader, tmp_path: Path) -> None:
    video = _write_video(tmp_path / "windows.mp4", "CHAPTER 3", seconds=6.0, moving=True)
    reader.recent.clear()
    first = read_span(reader, video, 0.0, 4.0)
    before = dict(reader.counts)
    second = read_span(reader, video, 2.0, 6.0)  # samples 3 s (read above) and 5 s
    assert first["frames"] == second["frames"] == 2
    assert reader.counts["detected"] - before["detected"] == 1
    assert reader.counts["reused_frames"] - before["reused_frames"] == 1
    assert second["lines"][0]["start"] == first["lines"][0]["end"], "the shared frame keeps its time"
