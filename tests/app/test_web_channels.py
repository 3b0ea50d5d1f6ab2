"""The page's cards for a search over several channels: which channels matched, the on-screen
words highlighted, and a preview that starts where they show."""

from __future__ import annotations

from pathlib import Path

from app.web import CorpusGuard, render_hits
from indexer.search import Hit, clip_key


def test_cards_show_channels_the_highlighted_line_and_start_at_it(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    root.mkdir()
    (root / "a.mp4").write_bytes(b"x")
    text = {"text": "Sale <b>50</b> OFF", "start": 3.0, "end": 5.0, "spans": [[0, 4], [15, 18]],
            "snippet": "«Sale» <b>50</b> «OFF»", "terms": ["sale", "off"]}
    hit = Hit(4, str(root / "a.mp4"), None, None, 0.04, [], [], channels={"visual": {"rank": 7, "score": 0.2},
              "text": {"rank": 1, "score": 3.1}}, text=text)
    html = render_hits([hit], CorpusGuard([root]))
    key = clip_key(str(root / "a.mp4"), None, None)   # the whole video: its key, played from the words
    assert f'src="vtr/clip/{key}#t=3.00"' in html, "the preview starts where the words are on screen"
    assert 'data-channel="visual">visual #7' in html and 'data-channel="text">text #1' in html
    assert "<mark>Sale</mark> &lt;b&gt;50&lt;/b&gt; <mark>OFF</mark>" in html
    assert "<b>" not in html
    # a picture hit that only the visual channel ranked shows no on-screen line
    seen = Hit(5, str(root / "a.mp4"), 1.0, 2.0, 0.3, [], [], channels={"visual": {"rank": 1, "score": 0.3},
               })
    html = render_hits([seen], CorpusGuard([root]))
    assert "vtr-onscreen" not in html and f'src="vtr/clip/{clip_key(str(root / "a.mp4"), 1.0, 2.0)}#t=1.00,2.00"' in html
    plain = render_hits([Hit(6, str(root / "a.mp4"), None, None, 0.3, [], [])], CorpusGuard([root]))
    assert "vtr-channels" not in plain
