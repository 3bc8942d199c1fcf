"""Fixtures for the end-to-end tests: one real gateway stack per test session, the official
openai SDK pointed at it, and OpenAI's own schemas to check answers against when the spec is
at hand. The helpers they use are in harness.py."""

from __future__ import annotations

import os
import shutil

import httpx2
import openai
import pytest

from harness import (KEY_FILE, REPORTED, SPEC_PATH, Redis, Spec, Stack, add_failing_backends, add_keyed_backends,
                     with_client_api_keys)


@pytest.fixture(scope="session")
def stack():
    KEY_FILE.write_text("sk-from-file-1\n")

    def adjust(config: dict) -> None:
        add_failing_backends(config)
        add_keyed_backends(config)

    with Stack(adjust_config=adjust, key_dirs=[KEY_FILE.parent]) as s:
        yield s


@pytest.fixture(scope="session")
def client_api_gateway():
    """A gateway with client keys (stored responses belong to a key), for the Responses and
    Messages APIs' tests."""
    with Stack(adjust_config=with_client_api_keys) as s:
        yield s


@pytest.fixture(scope="module")
def redis():
    """A Redis of the module's own, for state that several gateways share."""
    if not shutil.which("redis-server") and not os.environ.get("CI"):
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server; .ci/run installs it)")
    with Redis() as r:
        yield r


@pytest.fixture
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def http(stack):
    with httpx2.Client(base_url=f"http://127.0.0.1:{stack.port}", timeout=30) as c:
        yield c


_spec: Spec | None = None


@pytest.fixture(scope="session")
def spec() -> Spec:
    global _spec
    _spec = Spec(SPEC_PATH)
    return _spec


def pytest_collection_modifyitems(config, items):
    """test_kubernetes_gateway runs on the bring-your-own Gateway only the tests it names there."""
    def elsewhere(item) -> bool:
        only = getattr(item.module, "ON_YOUR_GATEWAY_TOO", None)
        params = getattr(item, "callspec", None)
        return only is not None and params is not None and params.params.get("deployment") == "bring-your-own" \
            and item.originalname not in only

    deselected = [item for item in items if elsewhere(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not elsewhere(item)]


def pytest_terminal_summary(terminalreporter):
    for line in REPORTED:
        terminalreporter.write_line(line)
    if _spec is None:
        return
    if _spec.available:
        terminalreporter.write_line(f"OpenAI schema validation: on ({_spec.path})")
    else:
        terminalreporter.write_line(f"OpenAI schema validation: SKIPPED, spec not found at {_spec.path} "
                                    "(set OPENAI_OPENAPI_SPEC)")
