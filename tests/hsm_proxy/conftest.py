"""Fixtures: one real proxy per test module (SoftHSM2 tokens, dev PKI, mTLS)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.hsm_proxy import ProxyEnv, ProxyProcess


@pytest.fixture(scope="module")
def proxy_env(tmp_path_factory: pytest.TempPathFactory) -> ProxyEnv:
    return ProxyEnv.create(tmp_path_factory.mktemp("hsm-proxy"))


@pytest.fixture(scope="module")
def proxy(proxy_env: ProxyEnv) -> Iterator[ProxyProcess]:
    with ProxyProcess(proxy_env) as running:
        yield running
