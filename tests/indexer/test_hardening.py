"""What an index job and a published index refuse: concurrent runs, replacing another job's
index, bad options found late, damaged files, huge k, a full disk, malformed decoder output.

A tiny random model over a tiny synthetic corpus; every refusal must come before any work (no
work directory left behind, the existing index untouched) and be one line with exit status 2.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from app.cli import app
from indexer.checksums import RECORD_SHA_KEY
from indexer.jobs import JobError, JobSpec, Shard, WorkDir, publish_job, run_index_job, work_dir_for
from indexer.store import open_index, write_index
from retrieval.data.synthetic import generate_corpus

REPO = Path(__file__).resolve().parents[2]
PART_SIZE = 2


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, n_train=1, n_test=4, size=32, long_videos=0, progress=False)
    return root / "videos"


def _spec(model_dir: Path, videos: Path, out: Path, **changes) -> JobSpec:
    return replace(JobSpec(model_dir=model_dir, out=out, videos=videos, part_size=PART_SIZE), **changes)


@pytest.fixture(scope="module")
def built(model_dir: Path, videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built") / "index"
    run_index_job(_spec(model_dir, videos, out), workers=0, batch_size=4, progress=False)
    return out


def _copy_index(index: Path, to: Path) -> Path:
    """A private, plain-directory copy of a published index."""
    shutil.copytree(index.resolve(), to)
    return to


def _index(*args: str) -> object:
    return CliRunner().invoke(app, ["index", *args])


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    error = [line for line in lines if line.startswith("error:")]
    assert len(error) == 1, result.output
    for fragment in fragments:
        assert fragment in error[0], result.output


# ---------------------------------------------------------------------------------- 4. locks


def _hold_lock(code: str) -> subprocess.Popen:
    """Another process that takes a lock, says so, and keeps it until its stdin closes."""
    script = textwrap.dedent(code) + "\nprint('locked', flush=True)\nsys.stdin.read()\n"
    proc = subprocess.Popen([sys.executable, "-c", "import sys\n" + script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO),
                                                                              "PATH": "/usr/bin:/bin"})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_on_the_same_index_is_refused(model_dir: Path, videos: Path, built: Path,
                                                       tmp_path: Path) -> None:
    out = _copy_index(built, tmp_path / "index")
    holder = _hold_lock(f"""
        from indexer.locks import index_lock
        lock = index_lock({str(out)!r}); lock.__enter__()
    """)
    try:
        result = _index("--model", str(model_dir), "--videos", str(videos), "--out", str(out), "--workers", "0")
        _one_line_error(result, f"in use by process {holder.pid}")
        assert not work_dir_for(out).exists()
        _one_line_error(_index("merge", str(out)), f"in use by process {holder.pid}")
        with pytest.raises(ValueError, match=f"process {holder.pid}"):  # a second publisher
            write_index(out, np.eye(2, 24, dtype=np.float32), [{"path": "a"}, {"path": "b"}],
                        {"name": "m", "weights_sha256": "0"}, str(videos))
        assert len(open_index(out)) == len(open_index(built))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # the lock went with the process: the same command now runs
    result = _index("--model", str(model_dir), "--videos", str(videos), "--out", str(out), "--workers", "0",
                    "--no-progress")
    assert result.exit_code == 0, result.output


def test_two_runs_of_one_shard_are_refused_but_other_shards_run(model_dir: Path, videos: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "index"
    holder = _hold_lock(f"""
        from indexer.locks import shard_lock
        lock = shard_lock({str(out)!r}, 0, 2); lock.__enter__()
    """)
    try:
        with pytest.raises(ValueError, match=f"shard 0/2 .* in use by process {holder.pid}"):
            run_index_job(_spec(model_dir, videos, out), Shard(0, 2), workers=0, progress=False)
        summary = run_index_job(_spec(model_dir, videos, out), Shard(1, 2), workers=0, progress=False)
        assert summary.indexed == 2 and summary.published is None
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


# ---------------------------------------------------------------------------------- 5. overwrite


def test_an_index_of_another_model_is_not_replaced_without_overwrite(model_dir: Path, other_model_dir: Path,
                                                                    videos: Path, built: Path,
                                                                    tmp_path: Path) -> None:
    out = _copy_index(built, tmp_path / "index")
    before = (out / "manifest.json").read_bytes()
    base = ["--videos", str(videos), "--out", str(out), "--workers", "0", "--no-progress"]
    _one_line_error(_index("--model", str(other_model_dir), *base), "holds an index built with model", "--overwrite")
    _one_line_error(_index("--model", str(other_model_dir), *base, "--resume"), "published by another job")
    # another corpus (the same videos under another root) counts as well
    _one_line_error(_index("--model", str(model_dir), *base[:1], str(videos.parent), *base[2:]), "corpus")
    assert (out / "manifest.json").read_bytes() == before and not work_dir_for(out).exists()

    assert _index("--model", str(model_dir), *base, "--resume").exit_code == 0  # its own job: nothing to do
    result = _index("--model", str(other_model_dir), *base, "--overwrite")
    assert result.exit_code == 0, result.output
    from retrieval.models.model_dir import model_identity

    assert open_index(out).manifest["model"]["weights_sha256"] == model_identity(other_model_dir)["weights_sha256"]


def test_a_folder_that_is_not_an_index_is_refused_before_any_work(model_dir: Path, videos: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        result = _index("--model", str(model_dir), "--videos", str(videos), "--out", str(out), "--workers", "0",
                        *extra)
        _one_line_error(result, "is a folder that is not a vtr index")
    assert [p.name for p in out.iterdir()] == ["thesis.tex"] and not work_dir_for(out).exists()
    # an empty folder holds nothing to lose
    empty = tmp_path / "empty"
    empty.mkdir()
    summary = run_index_job(_spec(model_dir, videos, empty), workers=0, progress=False)
    assert summary.published == empty and len(open_index(empty)) == 5


def test_convert_does_not_overwrite_a_model_without_overwrite(model_dir: Path, tmp_path: Path) -> None:
    target = shutil.copytree(model_dir, tmp_path / "trained")
    weights = (target / "model.safetensors").read_bytes()
    result = CliRunner().invoke(app, ["convert", "-c", str(tmp_path / "official.pth"), "-o", str(target)])
    _one_line_error(result, "already holds a model", "--overwrite")
    assert (target / "model.safetensors").read_bytes() == weights
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("x")
    _one_line_error(CliRunner().invoke(app, ["convert", "-c", str(tmp_path / "o.pth"), "-o", str(notes)]),
                    "not a model directory")
    # with --overwrite the checks pass and the next problem (the missing checkpoint) is reported
    result = CliRunner().invoke(app, ["convert", "-c", str(tmp_path / "official.pth"), "-o", str(target),
                                      "--overwrite"])
    assert result.exit_code == 2 and "already holds" not in result.output


# ---------------------------------------------------------------------------------- 6. options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--index-type", "Bogus"], "--index-type 'Bogus'"),
        (["--index-type", "IVF8,PQ7x8"], "--index-type 'IVF8,PQ7x8'"),  # 24 is not a multiple of 7
        (["--window", "-1"], "--window must be a positive"),
        (["--window", "4", "--stride", "0"], "--stride must be a positive"),
        (["--stride", "2"], "--stride needs --window"),
        (["--max-memory", "0"], "--max-memory must be positive"),
        (["--max-memory", "lots"], "cannot read 'lots' as a size"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--part-size", "0"], "--part-size must be >= 1"),
    ],
)
def test_bad_options_are_refused_before_the_first_clip(model_dir: Path, videos: Path, tmp_path: Path,
                                                       monkeypatch, options: list[str], message: str) -> None:
    from retrieval.data import video

    def no_decoding(*args, **kwargs):
        raise AssertionError("a clip was decoded before the options were checked")

    monkeypatch.setattr(video, "read_frames", no_decoding)
    out = tmp_path / "index"
    result = _index("--model", str(model_dir), "--videos", str(videos), "--out", str(out), "--workers", "0",
                    *options)
    _one_line_error(result, message)
    assert list(tmp_path.iterdir()) == []  # nothing left behind: the corrected run starts cleanly


def test_the_file_system_root_or_home_is_not_a_corpus(model_dir: Path, tmp_path: Path) -> None:
    for root in ("/", str(Path.home())):
        result = _index("--model", str(model_dir), "--videos", root, "--out", str(tmp_path / "index"))
        _one_line_error(result, "point --videos at the folder of videos")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- 7. checksums


def test_damaged_index_files_are_named_on_open(built: Path, tmp_path: Path) -> None:
    out = _copy_index(built, tmp_path / "index")
    faiss_file = out / "index.faiss"
    data = bytearray(faiss_file.read_bytes())
    data[len(data) - 9] ^= 0x10  # one bit, inside the stored vectors
    faiss_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"index.faiss in .* is damaged .*sha256.*vtr index \.\.\. --overwrite"):
        open_index(out)
    result = CliRunner().invoke(app, ["search", "a circle", "--index", str(out)])
    _one_line_error(result, "index.faiss", "damaged")

    shutil.rmtree(out)
    out = _copy_index(built, out)
    vectors = out / "vectors.f16.npy"
    vectors.write_bytes(vectors.read_bytes()[:-40])
    with pytest.raises(ValueError, match="vectors.f16.npy in .* is damaged .truncated"):
        open_index(out)
    (out / "manifest.json").write_text('{"format": "vtr-index", "dim"')  # cut short
    with pytest.raises(ValueError, match="manifest.json in .* is damaged"):
        open_index(out)


def _two_shards(model_dir: Path, videos: Path, out: Path) -> WorkDir:
    for shard in (Shard(0, 2), Shard(1, 2)):
        run_index_job(_spec(model_dir, videos, out), shard, workers=0, progress=False)
    return WorkDir(work_dir_for(out))


def test_damaged_parts_are_named_on_merge(model_dir: Path, videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    work = _two_shards(model_dir, videos, out)
    manifest = work.read_manifest(1)
    assert manifest["vectors_file"]["bytes"] == work.vectors_path(1).stat().st_size
    original = np.load(work.vectors_path(1))
    np.save(work.vectors_path(1), np.zeros_like(original))  # same shape, all zeros
    with pytest.raises(JobError, match=r"part-000001.npy in .* is damaged .*delete .*part-000001.json.*--resume"):
        publish_job(out)
    # a part recorded before checksums existed: zero vectors are still caught
    del manifest["vectors_file"], manifest[RECORD_SHA_KEY]
    work.manifest_path(1).write_text(json.dumps(manifest))
    with pytest.raises(JobError, match="all-zero vectors"):
        publish_job(out)
    np.save(work.vectors_path(1), original[:1])  # one row short
    with pytest.raises(JobError, match="part 1 is corrupt"):
        publish_job(out)
    work.manifest_path(1).write_text('{"part": 1, "ite')
    result = _index("merge", str(out))
    _one_line_error(result, "part-000001.json", "damaged")
    assert not out.exists()  # nothing was published from damaged parts


# ---------------------------------------------------------------------------------- 8. k


def test_k_is_clamped_to_the_index_size(built: Path, monkeypatch) -> None:
    from indexer import store

    asked = []
    real = store.search_index

    def spy(index, queries, k, **kwargs):
        asked.append(k)
        # FAISS would allocate k results per query (and abort when that fails): never pass it on
        assert k <= index.ntotal, f"k={k} reached FAISS for an index of {index.ntotal}"
        return real(index, queries, k, **kwargs)

    monkeypatch.setattr(store, "search_index", spy)
    reader = open_index(built)
    hits = reader.search(np.asarray(reader.vectors[0], np.float32), k=2_000_000_000)[0]
    assert len(hits) == len(reader) == 5 and asked == [5]
    with pytest.raises(ValueError, match="k must be positive"):
        reader.search(np.asarray(reader.vectors[0], np.float32), k=0)
    _one_line_error(CliRunner().invoke(app, ["search", "a circle", "--index", str(built), "-k", "0"]), "-k")


# ---------------------------------------------------------------------------------- 10. full disk


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_writing_a_part_is_one_line(model_dir: Path, videos: Path, tmp_path: Path,
                                                     monkeypatch) -> None:
    from indexer import jobs

    monkeypatch.setattr(jobs, "atomic_write", _disk_full)
    out = tmp_path / "index"
    result = _index("--model", str(model_dir), "--videos", str(videos), "--out", str(out), "--workers", "0",
                    "--no-progress")
    _one_line_error(result, "no space left on device", "writing part 0", "--resume")
    assert not out.exists()


def test_a_full_disk_while_publishing_keeps_the_parts(model_dir: Path, videos: Path, built: Path,
                                                     tmp_path: Path, monkeypatch) -> None:
    from indexer import store

    out = _copy_index(built, tmp_path / "index")
    before = (out / "manifest.json").read_bytes()
    monkeypatch.setattr(store, "_write_faiss", _disk_full)
    result = _index("--model", str(model_dir), "--videos", str(videos), "--out", str(out), "--workers", "0",
                    "--no-progress")
    _one_line_error(result, "no space left on device", "publishing", "vtr index merge")
    work = WorkDir(work_dir_for(out))
    assert [p.name for p in work.parts_dir.glob("part-*.json")] == ["part-000000.json"]  # kept
    assert (out / "manifest.json").read_bytes() == before  # the old index is untouched
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    monkeypatch.undo()
    assert _index("merge", str(out)).exit_code == 0 and len(open_index(out)) == 5


# ---------------------------------------------------------------------------------- 11. decoding


def test_malformed_decoder_output_is_a_recorded_failure(model_dir: Path, videos: Path, tmp_path: Path,
                                                        monkeypatch) -> None:
    from retrieval.data import video

    real_decord, real_pyav = video._read_with_decord, video._read_with_pyav

    def bad_channels(real):
        def read(path, choose):
            frames, *rest = real(path, choose)
            if path.name == "0002.mp4" and path.parent.name == "test":
                frames = frames[..., :2]  # two channels: preprocessing would raise on it
            return (frames, *rest)
        return read

    monkeypatch.setattr(video, "_read_with_decord", bad_channels(real_decord))
    monkeypatch.setattr(video, "_read_with_pyav", bad_channels(real_pyav))
    summary = run_index_job(_spec(model_dir, videos, tmp_path / "index"), workers=0, progress=False)
    assert (summary.indexed, summary.failed) == (4, 1)
    (failure,) = open_index(tmp_path / "index").failures
    assert failure["path"].endswith("test/0002.mp4") and "uint8 frames" in failure["reason"]
