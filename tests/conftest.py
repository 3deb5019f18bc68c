import os

import torch

# The Triton kernels run under the interpreter when there is no GPU; this must be set before triton
# is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison_empty(monkeypatch):
    """Use in kernel and sweep tests: `pytestmark = pytest.mark.usefixtures("poison_empty")`."""
    # Outputs allocated with torch.empty hold NaN, so an element a kernel forgot to write fails loudly.
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.dtype.is_floating_point:
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    yield


@pytest.fixture
def device():
    return DEVICE
