"""CLI argument parsing that has no other home: sizes for --max-memory."""
import pytest
from typer.testing import CliRunner

from app.cli import app as cli_app
from app.cmd_index import parse_bytes


@pytest.mark.parametrize("text,expected", [
    ("1000000", 1_000_000), ("512M", 512 * 2**20), ("512MB", 512 * 2**20), ("8G", 8 * 2**30),
    ("1.5GiB", int(1.5 * 2**30)), ("2k", 2048), ("1T", 2**40),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "", "8 GB of RAM", "-1G", "G"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError, match="as a size"):
        parse_bytes(text)


def test_index_max_memory_error_is_one_line(tmp_path):
    result = CliRunner().invoke(cli_app, ["index", "--model", str(tmp_path), "--videos", str(tmp_path),
                                          "--out", str(tmp_path / "idx"), "--max-memory", "lots"])
    assert result.exit_code == 2
    assert "cannot read 'lots' as a size" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "idx").exists()
