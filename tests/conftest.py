import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# set before anything imports transformers or gradio
import pytest
import torch

from indexer.jobs import JobSpec, run_index_job
from retrieval.data.synthetic import generate_corpus
from retrieval.models.retrieval_model import RetrievalModel, build_retrieval_model

# 2 = the reference machine's cores; VTR_TEST_THREADS=1 keeps the suite usable beside other work
torch.set_num_threads(int(os.environ.get("VTR_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture()
def one_line_error():
    """Check a CLI result is what every user error must be: exit status 2, no traceback, exactly
    one ``error:`` line holding each of ``fragments``."""

    def check(result, *fragments: str) -> None:
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.output
        for fragment in fragments:
            assert fragment in errors[0], result.output

    return check


# ------------------------------------------------------------------ shared tiny objects
# Built once per test session: tests read them and never write into them (a test that changes a
# model directory, a corpus or an index works on its own copy, e.g. ``shutil.copytree``); each
# checks at the end of the session that no test changed it.


def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    return {path.relative_to(root).as_posix(): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(root.rglob("*")) if path.is_file()}


def _unchanged(root: Path) -> Iterator[Path]:
    """Yield ``root``; afterwards fail if a test added, removed or rewrote a file under it."""
    before = _tree_state(root)
    yield root
    after = _tree_state(root)
    rewritten = {name for name in before if after.get(name) not in (None, before[name])}
    changed = sorted(set(before) ^ set(after) | rewritten)
    assert not changed, f"a test changed the shared {root.name}: {changed[:5]} (copy it first)"


def _tiny_model(seed: int = 0, **changes: Any) -> RetrievalModel:
    """The suite's tiny untrained retrieval model (VideoMamba tiny, 24-d, one fusion layer) with
    the weights ``seed`` draws; ``changes``: other :func:`build_retrieval_model` options."""
    torch.manual_seed(seed)
    options = {"embed_dim": 24, "num_fusion_layers": 1, **changes}
    return build_retrieval_model("videomamba_tiny_test", **options)


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., RetrievalModel]:
    """``tiny_model(seed=0, **changes)``: a new copy of the suite's tiny model (in memory, the
    test's own: tests may change it), so every test that needs one builds the same."""
    return _tiny_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The suite's tiny model saved as a model directory (read-only for the tests)."""
    yield from _unchanged(_tiny_model(0).save(tmp_path_factory.mktemp("model") / "tiny"))


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny synthetic corpus (read-only for the tests): 4 train and 8 test clips of 3 s
    (``train.json``, ``test.json``, ``videos/{train,test}/NNNN.mp4``, 32 px) and 2 long
    multi-scene videos (``long.json``, ``videos/long/``)."""
    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, n_train=4, n_test=8, size=32, long_videos=2, progress=False)
    yield from _unchanged(root)


@pytest.fixture(scope="session")
def search_index(synthetic_corpus: Path, model_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The index (read-only for the tests) of :func:`synthetic_corpus`'s 8 test clips, whole,
    built with :func:`model_dir`."""
    out = tmp_path_factory.mktemp("index") / "test"
    spec = JobSpec(model_dir=model_dir, out=out, videos=synthetic_corpus / "videos",
                   ann_file=synthetic_corpus / "test.json")
    run_index_job(spec, workers=0, batch_size=8, progress=False)
    yield from _unchanged(out)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture as :func:`model_dir` with other weights: another model (a model is
    its weights, not its folder's name)."""
    return _tiny_model(1).save(tmp_path_factory.mktemp("model") / "other")
