"""The demo's channel step on a few clips: the written and spoken clips beside the test split, an
index with every installed channel, and the queries the demo suggests (the full `vtr demo` run,
training included, is tests/app/test_demo.py)."""
import json
from pathlib import Path

import pytest

from app.demo import build_channel_clips, build_index, channel_queries, demo_channels
from indexer.channels import index_channels
from indexer.search import Searcher
from indexer.store import open_index
from retrieval.data.synthetic import generate_corpus
from retrieval.speech import speech_available

pytest.importorskip("rapidocr_onnxruntime", reason="the ocr extra (make install installs it)")


def test_demo_indexes_written_and_spoken_clips_beside_the_test_split(tmp_path: Path, model_dir: Path) -> None:
    corpus = tmp_path / "corpus"
    generate_corpus(corpus, n_train=1, n_test=3, size=128, long_videos=1, progress=False)
    before = (corpus / "test.json").read_text()
    build_channel_clips(corpus)
    assert (corpus / "test.json").read_text() == before, "the evaluated split is left as it was"
    entries = json.loads((corpus / "channels" / "test.json").read_text())
    written = [entry for entry in entries if "written" in entry["attributes"]]
    spoken = [entry for entry in entries if "spoken" in entry["attributes"]]
    assert len(written) == len(entries) // 2 and (spoken or not speech_available())

    channels = demo_channels()
    assert channels[:2] == ("visual", "text") and (("speech" in channels) == speech_available())
    model = model_dir
    index = build_index(tmp_path / "work", corpus, model, channels)
    reader = open_index(index)
    assert index_channels(reader.manifest) == channels
    paths = {Path(item["path"]).relative_to(corpus.resolve()).parts[0] for item in reader.items}
    assert paths == {"videos", "channels"}, "test clips, long-video windows and channel clips in one index"
    assert sum(item["start"] is not None for item in reader.items) > 1, "the long video is cut into windows"

    queries = channel_queries(corpus)
    assert queries[0] == f'a title that reads "{written[0]["attributes"]["written"]["text"]}"'
    searcher = Searcher(index)
    for entry in written:
        (hit,) = searcher.search(f'a title that reads "{entry["attributes"]["written"]["text"]}"', k=1)
        assert hit.path.endswith(f"channels/videos/{entry['video']}"), (entry["attributes"]["written"], hit.path)
        assert hit.text is not None and "«" in hit.text["snippet"]
    if "speech" in channels:
        assert queries[1].startswith("a voice says") and any(
            item["extra"].get("speech", {}).get("words") for item in reader.items)
    assert build_index(tmp_path / "work", corpus, model, channels) == index, "a second run reuses the index"
