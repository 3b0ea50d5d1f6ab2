"""The wheel carries the configs: a non-editable install finds models, recipes and label sets."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


CHECK = """
import retrieval, sys
from pathlib import Path
assert Path(retrieval.__file__).is_relative_to(Path(sys.argv[1])), retrieval.__file__
from retrieval.models.registry import config_root, list_models, create_model
from retrieval.train.recipe import load_recipe
from retrieval.labels import load_labels
assert config_root().is_relative_to(Path(sys.argv[1])), config_root()
assert "videomamba_tiny_test" in list_models()
model = create_model("videomamba_tiny_test")
recipe = load_recipe(config_root() / "train" / "demo.yaml")
labels = load_labels("synthetic")
print(type(model).__name__, recipe.model.video, len(labels))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(REPO)], check=True, capture_output=True, text=True)
    (whl,) = out.glob("vtr-*.whl")
    return whl


def test_wheel_carries_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    repo_configs = {p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*")
                    if p.is_file() and p.suffix in (".yaml", ".txt")}
    assert repo_configs, "no configs in the checkout"
    assert {f"vtr_configs/{name}" for name in repo_configs} <= names
    assert "retrieval/models/ssm/scan_kernel.c" in names


def test_installed_copy_loads_model_recipe_and_labels(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {k: v for k, v in os.environ.items() if k != "VTR_CONFIG_DIR"}
    env["PYTHONPATH"] = str(site)
    run = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    model, video, n_labels = run.stdout.split()
    assert model == "VideoMamba" and video == "videomamba_demo"
    expected = [line for line in (REPO / "configs/labels/synthetic.txt").read_text().splitlines() if line.strip()]
    assert int(n_labels) == len(expected)
