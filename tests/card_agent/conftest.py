from __future__ import annotations

from pathlib import Path

import pytest

from card_agent.connection import ServerTarget
from deploy.pki import Pki, init_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return init_pki(tmp_path_factory.mktemp("pki"), ("access-server", "card-agent", "admin"))


@pytest.fixture(scope="session")
def agent_files(pki: Pki) -> tuple[Path, Path, Path]:
    ident = pki.identity("card-agent")
    return pki.ca, ident.cert, ident.key


def target_for(pki: Pki, address: str) -> ServerTarget:
    ident = pki.identity("card-agent")
    return ServerTarget(address, pki.ca, ident.cert, ident.key)
