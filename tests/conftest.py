import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """Tokenized corpora are cached per test session, never in the user's home."""
    os.environ.setdefault("MEGACLUSTER_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
