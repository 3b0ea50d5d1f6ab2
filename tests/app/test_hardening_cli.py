"""One line and exit status 2, before any work, for bad recipes, damaged weights and a synthetic
corpus pointed at somebody else's folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import app

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def no_training(monkeypatch):
    """Training must never start for a recipe that is refused."""
    from retrieval.train import loop

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(loop, "train", refuse)


def test_malformed_yaml_in_a_recipe_or_an_override(tmp_path: Path, no_training, one_line_error) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  video: videomamba_demo\n optim:\n   lr: [1e-3\n")
    one_line_error(CliRunner().invoke(app, ["train", str(recipe)]), "bad.yaml is not valid YAML", "line ")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    one_line_error(CliRunner().invoke(app, ["train", str(binary)]), "not a text file")
    demo = str(REPO / "configs/train/demo.yaml")
    one_line_error(CliRunner().invoke(app, ["train", demo, "optim.lr=[1e-3"]), "override", "not valid YAML")
    one_line_error(CliRunner().invoke(app, ["train", demo, "optim.lr={"]), "not valid YAML")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.save_every=0", "run.save_every must be >= 1"),
        ("run.log_every=0", "run.log_every must be >= 1"),
        ("optim.lr=-1e-3", "optim.lr must be a positive number"),
        ("optim.lr=0", "optim.lr must be a positive number"),
        ("optim.warmup_steps=-5", "optim.warmup_steps must be >= 0"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
        ("loss.vtc=.nan", "loss.vtc must be a finite number"),
        ("loss.mlm=.inf", "loss.mlm must be a finite number"),
        ("optim.grad_clip=.nan", "optim.grad_clip must be a finite number"),
        ("optim.lr=.inf", "optim.lr must be a finite number"),
        ("optim.lr=1e999", "optim.lr must be a finite number"),
        ("model.video_overrides={drop_path_rate: .nan}", "model.video_overrides.drop_path_rate must be a finite"),
        ("model.embed_dim=-5", "model.embed_dim must be >= 1"),
        ("model.embed_dim=0", "model.embed_dim must be >= 1"),
        ("model.max_text_len=0", "model.max_text_len must be >= 3"),
        ("model.num_fusion_layers=-1", "model.num_fusion_layers must be >= 0"),
        ("data.frames_per_segment=0", "data.frames_per_segment must be >= 1"),
        ("data.workers=-2", "data.workers must be >= 0"),
        ("model.text_dropout=1.5", "model.text_dropout must be in [0, 1)"),
        ("loss.mlm_prob=1.5", "loss.mlm_prob (the share of caption tokens masked) must be in"),
    ],
)
def test_recipe_values_that_cannot_train(override: str, message: str, no_training, one_line_error) -> None:
    result = CliRunner().invoke(app, ["train", str(REPO / "configs/train/demo.yaml"), override])
    one_line_error(result, message)


def test_a_deeply_nested_recipe_is_one_line(tmp_path: Path, no_training, one_line_error) -> None:
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("model:\n  video_overrides: " + "[" * 100_000 + "\n")
    one_line_error(CliRunner().invoke(app, ["train", str(recipe)]), "deep.yaml is nested too deeply")
    demo = str(REPO / "configs/train/demo.yaml")
    one_line_error(CliRunner().invoke(app, ["train", demo, "model.video_overrides=" + "[" * 100_000]),
                    "'model.video_overrides': the value is nested too deeply")


def test_truncated_or_empty_weights_are_one_line(model_dir: Path, tmp_path: Path, one_line_error) -> None:
    assert CliRunner().invoke(app, ["info", str(model_dir)]).exit_code == 0
    broken = shutil.copytree(model_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_line_error(CliRunner().invoke(app, ["info", str(broken)]), "model.safetensors is damaged or truncated")
    weights.write_bytes(b"")
    one_line_error(CliRunner().invoke(app, ["info", str(broken)]), "model.safetensors is empty (0 bytes)")


def test_synth_refuses_a_folder_that_is_not_its_own(tmp_path: Path, one_line_error) -> None:
    target = tmp_path / "holiday"
    (target / "videos" / "train").mkdir(parents=True)
    (target / "videos" / "train" / "beach.mp4").write_bytes(b"precious")
    (target / "train.json").write_text("my own annotations")
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(target), "--n-train", "2", "--n-test", "2",
                                      "--long", "0", "--size", "32"])
    one_line_error(result, "not empty and was not written by the synthetic corpus generator")
    assert (target / "videos" / "train" / "beach.mp4").read_bytes() == b"precious"
    assert (target / "train.json").read_text() == "my own annotations"
    assert sorted(p.name for p in target.rglob("*")) == ["beach.mp4", "train", "train.json", "videos"]


def test_synth_only_removes_files_it_wrote(tmp_path: Path) -> None:
    from retrieval.data.synthetic import generate_corpus

    tiny = {"seed": 1, "size": 32, "num_frames": 4, "long_videos": 0, "progress": False}
    generate_corpus(tmp_path, n_train=3, n_test=2, **tiny)
    (tmp_path / "videos/train/mine.mp4").write_bytes(b"a video of my own, added later")
    generate_corpus(tmp_path, n_train=2, n_test=2, **tiny)
    # its own stale clip is gone, the user's file is not
    assert sorted(p.name for p in (tmp_path / "videos/train").iterdir()) == ["0000.mp4", "0001.mp4", "mine.mp4"]
    record = json.loads((tmp_path / ".vtr-synthetic").read_text())
    assert "videos/train/0002.mp4" not in record["files"] and "videos/train/mine.mp4" not in record["files"]


TINY_SYNTH = {"seed": 1, "size": 32, "num_frames": 4, "long_videos": 0, "progress": False}


def test_synth_never_overwrites_a_users_clip_under_a_planned_name(tmp_path: Path, one_line_error) -> None:
    from retrieval.data.synthetic import generate_corpus

    generate_corpus(tmp_path, n_train=3, n_test=2, **TINY_SYNTH)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    mine = tmp_path / "videos/train/0007.mp4"
    mine.write_bytes(b"my own clip, saved where the next corpus would put one")
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path), "--n-train", "8", "--n-test", "2",
                                      "--long", "0", "--size", "32", "--seed", "1"])
    one_line_error(result, "videos/train/0007.mp4 was not written by the synthetic corpus generator")
    assert mine.read_bytes() == b"my own clip, saved where the next corpus would put one"
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p != mine} == before


def test_synth_keeps_a_users_clip_saved_under_a_generated_name_and_their_temporaries(tmp_path: Path) -> None:
    from retrieval.data.synthetic import generate_corpus

    generate_corpus(tmp_path, n_train=3, n_test=2, **TINY_SYNTH)
    replaced = tmp_path / "videos/train/0002.mp4"          # listed in the record, but now the user's
    replaced.write_bytes(b"the user's clip under a name the generator once used")
    temporaries = [tmp_path / "videos/train/.x.mp4.tmp-1234-abcd", tmp_path / "videos/test/.0000.mp4.tmp-9-ff"]
    for temporary in temporaries:
        temporary.write_bytes(b"the user's half-copied file")
    generate_corpus(tmp_path, n_train=2, n_test=2, **TINY_SYNTH)   # 0002 is no longer planned
    assert replaced.read_bytes() == b"the user's clip under a name the generator once used"
    assert all(t.read_bytes() == b"the user's half-copied file" for t in temporaries)
    record = json.loads((tmp_path / ".vtr-synthetic").read_text())["files"]
    assert "videos/train/0002.mp4" not in record and "videos/train/0001.mp4" in record
    # its own stale clip, unchanged since it wrote it, is removed as before
    generate_corpus(tmp_path, n_train=1, n_test=2, **TINY_SYNTH)
    assert not (tmp_path / "videos/train/0001.mp4").exists() and replaced.exists()


def test_synth_resumes_its_own_files_after_an_interruption(tmp_path: Path, monkeypatch) -> None:
    from retrieval.data import synthetic

    real, calls = synthetic.write_mp4, []

    def killed_on_the_fourth_clip(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(synthetic, "write_mp4", killed_on_the_fourth_clip)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate_corpus(tmp_path, n_train=4, n_test=2, **TINY_SYNTH)
    monkeypatch.setattr(synthetic, "write_mp4", real)
    # the three clips it wrote are proven its own by their receipts: the run goes on over them
    synthetic.generate_corpus(tmp_path, n_train=4, n_test=2, **TINY_SYNTH)
    record = json.loads((tmp_path / ".vtr-synthetic").read_text())["files"]
    assert len([name for name in record if name.startswith("videos/")]) == 6
    assert not (tmp_path / ".vtr-synthetic.work").exists()
