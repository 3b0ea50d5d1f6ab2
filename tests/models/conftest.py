"""Fixtures shared by the model tests."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from retrieval.models.convert_bert import default_text_model_path

from .test_convert_full import TINY_BERT, TOKENIZER_FILES


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """MiniLM's (bert-base-uncased vocabulary) tokenizer files beside a tiny BERT config.json."""
    src, dst = default_text_model_path(), tmp_path_factory.mktemp("bert")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    (dst / "config.json").write_text(json.dumps(TINY_BERT))
    return dst
