"""CLI argument parsing that has no other home: sizes for --max-memory (the option's one-line error
before any work is tested with the other index options in tests/indexer/test_hardening.py)."""
import pytest

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
