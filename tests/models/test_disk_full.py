"""A full disk while `vtr convert` or `vtr train` writes a model or a checkpoint: one line, exit
status 2, and the previous files exactly as they were (a whole model's tokenizer included: its
files switch with the weights).

The full disk is simulated where the bytes are written: safetensors' writer fails the way it does
on a full file system (its own ``SafetensorError`` carrying "os error 28", as measured on a 64 KB
tmpfs), and a Python file write raises ``OSError(ENOSPC)`` part-way through.
"""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from transformers import PreTrainedTokenizerBase
from typer.testing import CliRunner

from app.cli import app
from retrieval import load_model
from retrieval.models import model_dir as model_dir_module
from retrieval.train import loop
from retrieval.train.recipe import load_recipe

from .official_layout import official_checkpoint
from .test_convert import TINY
from .test_convert_full import save, videomamba_checkpoint


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _full_disk_safetensors(real):
    """safetensors' save_model that writes half the file, then fails as on a full disk."""

    def save(module, filename, **kwargs):
        real(module, filename, **kwargs)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    return save


@pytest.fixture()
def converted(tmp_path: Path) -> tuple[Path, Path]:
    """A model directory converted from one official checkpoint, and a second checkpoint."""
    torch.save(official_checkpoint(**TINY), tmp_path / "first.pth")
    torch.save(official_checkpoint(seed=1, **TINY), tmp_path / "second.pth")
    out = tmp_path / "model"
    assert CliRunner().invoke(app, ["convert", "-c", str(tmp_path / "first.pth"), "-o", str(out)]).exit_code == 0
    return out, tmp_path / "second.pth"


def test_convert_on_a_full_disk_keeps_the_previous_model(converted, one_line_error, monkeypatch) -> None:
    out, second = converted
    before = _snapshot(out)
    monkeypatch.setattr(model_dir_module, "save_safetensors_model",
                        _full_disk_safetensors(model_dir_module.save_safetensors_model))
    result = CliRunner().invoke(app, ["convert", "-c", str(second), "-o", str(out), "--overwrite"])
    one_line_error(result, "no space left on device", f"{out / 'model.safetensors'}")
    assert _snapshot(out) == before   # weights and config as they were, no temporaries left


def test_a_full_disk_while_writing_a_config_leaves_the_weights_too(converted, one_line_error,
                                                                   monkeypatch) -> None:
    out, second = converted
    before = _snapshot(out)
    real_write_text = Path.write_text

    def full(self, text, *args, **kwargs):
        if ".config.json.tmp" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    result = CliRunner().invoke(app, ["convert", "-c", str(second), "-o", str(out), "--overwrite"])
    one_line_error(result, "no space left on device", f"{out / 'config.json'}")
    assert _snapshot(out) == before   # the new weights never replaced the old ones


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    from retrieval.data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(out, n_train=8, n_test=2, size=32, long_videos=0, num_frames=4, progress=False)
    return out


def _recipe_args(corpus: Path, out: Path) -> list[str]:
    values = {"model.video": "videomamba_tiny_test", "model.embed_dim": 16, "model.num_fusion_layers": 1,
              "model.text_dropout": 0.0, "data.train": str(corpus / "train.json"), "data.videos": str(corpus / "videos"),
              "data.cache": True, "optim.batch_size": 4, "optim.steps": 4, "optim.warmup_steps": 1,
              "run.out": str(out), "run.save_every": 2, "run.log_every": 1, "run.progress": False}
    return [f"{key}={value}" for key, value in values.items()]


def test_train_on_a_full_disk_keeps_the_previous_checkpoint_and_model(tmp_path: Path, tiny_corpus: Path,
                                                                       one_line_error, monkeypatch) -> None:
    out = tmp_path / "run"
    args = _recipe_args(tiny_corpus, out)
    real_losses, calls = loop.compute_losses, []

    def stopped_in_step_3(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_losses(*a, **kw)

    monkeypatch.setattr(loop, "compute_losses", stopped_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        loop.train(load_recipe(None, args))
    monkeypatch.setattr(loop, "compute_losses", real_losses)
    # a checkpoint of step 2, and a model an earlier run left in run/model
    shutil.copytree(out / "checkpoint", out / "model", ignore=shutil.ignore_patterns(loop.STATE_FILE))
    before = _snapshot(out / "checkpoint"), _snapshot(out / "model")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")

    # the optimizer state fails part-way through (a Python file write on a full disk)
    real_save = torch.save

    def full(obj, target, *a, **kw):
        if hasattr(target, "write"):
            target.write(b"PK partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, target, *a, **kw)

    monkeypatch.setattr(torch, "save", full)
    result = CliRunner().invoke(app, ["train", str(recipe), "--resume", *args])
    one_line_error(result, "no space left on device", loop.STATE_FILE)
    assert (_snapshot(out / "checkpoint"), _snapshot(out / "model")) == before
    monkeypatch.setattr(torch, "save", real_save)

    # the final model's weights fail: the model already in run/model stays whole
    real_weights = model_dir_module.save_safetensors_model
    failing = _full_disk_safetensors(real_weights)
    monkeypatch.setattr(model_dir_module, "save_safetensors_model",
                        lambda module, filename, **kw: (failing if Path(filename).parent.name == "model.tmp"
                                                        else real_weights)(module, filename, **kw))
    result = CliRunner().invoke(app, ["train", str(recipe), "--resume", *args])
    one_line_error(result, "no space left on device", "model.safetensors")
    assert _snapshot(out / "model") == before[1]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint", "model"]


# ---------------------------------------------------------------------------------- a whole model's tokenizer


@pytest.fixture()
def converted_whole(tmp_path: Path, tokenizer_dir: Path) -> tuple[Path, Path, Path]:
    """A whole retrieval model converted with a tokenizer, its checkpoint, and a second tokenizer
    folder whose files differ (another maximum length)."""
    checkpoint = save(tmp_path, videomamba_checkpoint())
    out = tmp_path / "whole"
    result = CliRunner().invoke(app, ["convert", "-c", str(checkpoint), "-o", str(out), "--tokenizer",
                                      str(tokenizer_dir)])
    assert result.exit_code == 0, result.output
    second = tmp_path / "bert-2"
    shutil.copytree(tokenizer_dir, second)
    settings = json.loads((second / "tokenizer_config.json").read_text())
    (second / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 77}))
    return out, checkpoint, second


def test_a_full_disk_while_writing_the_tokenizer_keeps_the_whole_previous_model(converted_whole, one_line_error,
                                                                               monkeypatch) -> None:
    out, checkpoint, second = converted_whole
    before = _snapshot(out)
    real_save = PreTrainedTokenizerBase.save_pretrained

    def full(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)   # some files written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "vocab.txt"))

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full)
    result = CliRunner().invoke(app, ["convert", "-c", str(checkpoint), "-o", str(out), "--tokenizer", str(second),
                                      "--overwrite"])
    one_line_error(result, "no space left on device", str(out))
    assert _snapshot(out) == before   # no new weights beside the old tokenizer, no temporaries left


def test_a_full_disk_while_writing_the_weights_keeps_the_previous_tokenizer(converted_whole, one_line_error,
                                                                           monkeypatch) -> None:
    out, checkpoint, second = converted_whole
    before = _snapshot(out)
    monkeypatch.setattr(model_dir_module, "save_safetensors_model",
                        _full_disk_safetensors(model_dir_module.save_safetensors_model))
    result = CliRunner().invoke(app, ["convert", "-c", str(checkpoint), "-o", str(out), "--tokenizer", str(second),
                                      "--overwrite"])
    one_line_error(result, "no space left on device", f"{out / 'model.safetensors'}")
    assert _snapshot(out) == before   # the new tokenizer never replaced the old one


def test_overwriting_a_whole_model_replaces_its_tokenizer_with_it(converted_whole) -> None:
    out, checkpoint, second = converted_whole
    result = CliRunner().invoke(app, ["convert", "-c", str(checkpoint), "-o", str(out), "--tokenizer", str(second),
                                      "--overwrite"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 77
    assert load_model(out).tokenizer.model_max_length == 77
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no temporaries left"
