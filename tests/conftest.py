import os
from pathlib import Path

import pytest
import torch

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _few_threads():
    # Tests use tiny models: one thread avoids oversubscribing the CPU's two cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def soft_label_cache(tmp_path, monkeypatch):
    """Keep every test's soft-label cache out of the user's home."""
    path = tmp_path / "soft_labels"
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(path))
    return path


needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists() and not os.environ.get("CI"),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


def fails_cleanly(capsys, argv, expected: str) -> str:
    """`kdistill ARGV --quiet` exits with code 2 and one line on stderr that contains `expected`."""
    from kdistill.cli import main

    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdistill: error: ") and len(err.splitlines()) == 1, err
    assert expected in err, err
    return err
