import tomllib
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data" / "plan_public.toml"


@pytest.fixture(scope="session")
def public():
    return tomllib.loads(DATA.read_text())
