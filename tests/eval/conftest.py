"""Shared fixtures: a small synthetic corpus and an untrained tiny retrieval model.

A test module sets ``N_TEST`` (test clips) and ``CORPUS_SEED``; each module gets its own corpus.
"""
from pathlib import Path

import pytest
import torch

from retrieval.data.corpora import load_corpus
from retrieval.data.synthetic import generate_corpus


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread avoids OpenMP hand-off costs that dominate on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus_dir(request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_corpus(out, n_train=8, n_test=request.module.N_TEST, seed=request.module.CORPUS_SEED, size=32,
                    long_videos=0, progress=False)
    return out


@pytest.fixture(scope="module")
def corpus(corpus_dir):
    return load_corpus("generic", corpus_dir / "test.json", corpus_dir / "videos")


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model(with_mlm=False).eval()
