import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = Path(os.environ.get("CIFAR10_JPG", ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"))
PYTHON = sys.executable


@pytest.fixture(scope="session")
def shared_archive() -> Path:
    if not SHARED_ARCHIVE.is_file():
        pytest.fail(f"the shared CIFAR-10 archive is missing at {SHARED_ARCHIVE}; set CIFAR10_JPG to its path")
    return SHARED_ARCHIVE


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One decode cache for the whole session: the archive is decoded once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def cifar(shared_archive, data_dir):
    from tune import data

    return data.load(f"imagefolder:{shared_archive}", str(data_dir))
