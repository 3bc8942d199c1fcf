"""The simulator's own tests run against the simulated backends alone, started as the
demo starts them (tools/devstack.py), with no gateway in front."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

from devstack import Stack  # noqa: E402


@pytest.fixture(scope="session")
def simulators():
    """The demo's simulated backends, by name: `simulators.backend_url(name)`."""
    stack = Stack().start_simulators()
    try:
        yield stack
    finally:
        stack.stop()
