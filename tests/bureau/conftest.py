"""The bureau's and the mailing house's tests share one world per module: a real proxy
with every party's keys, initialized cards and their issuance (``tests.bureau.world``).

A module names its batch: ``PACK``, ``CARDS`` and, optionally, ``PREFIX`` (the cards'
serials) and ``PIN_MAKER`` (who makes PIN and PUK; default the bureau).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cms import perso_format as F
from tests.bureau.world import World, make_cards
from tests.support.issuer import issuer_proxy


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
          ) -> Iterator[World]:
    directory = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    with issuer_proxy(directory / "proxy") as proxy:
        made = World(proxy, directory)
        made.setup()
        yield made


@pytest.fixture(scope="module")
def templates(world: World, request: pytest.FixtureRequest) -> dict[str, Path]:
    """The module's initialized cards (copy them before use: tests change cards)."""
    return make_cards(world.directory / "templates", world.issuer_point, request.module.CARDS,
                      prefix=getattr(request.module, "PREFIX", "BUR"))


@pytest.fixture(scope="module")
def perso(world: World, templates: dict[str, Path], request: pytest.FixtureRequest) -> Path:
    """The signed personalization file of the module's cards."""
    return world.issue(world.directory / "issued", templates, request.module.PACK,
                       pin_puk_by=getattr(request.module, "PIN_MAKER", F.PinMaker.BUREAU))
