import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
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
