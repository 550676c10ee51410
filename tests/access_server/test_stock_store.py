"""The stock in the store, on SQLite and PostgreSQL: an import is all rows or none (an error
or a kill in the middle leaves nothing), the same pack again changes nothing, and cards are
reserved first in, first out by pack import order, then row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from access_server import packs
from access_server.store import StockState, Store
from access_server.store import stock as stock_module
from cms.runtime.errors import AlreadyExists, FailedPrecondition
from tests.access_server.test_store_fixtures import ACTOR
from tests.support import stock as S

pytest_plugins = ("tests.support.postgres", "tests.access_server.test_store_fixtures")

REPO = Path(__file__).resolve().parents[2]
PROVIDER = "acme-cards"

# A child that imports a pack and is killed the moment the second batch of cards is sent
# to the database: no rollback, no clean-up, no connection close.
KILLED_CHILD = """
import os, signal, sys
from pathlib import Path
from sqlalchemy.orm import Session
from access_server import packs
from access_server.store import Store, stock
import datetime as dt
url, directory = sys.argv[1:3]
data = Path(directory, "pack.csv").read_bytes()
signature = Path(directory, "pack.csv.p7s").read_bytes()
store = Store(url)
roots = [packs.Root(r.provider_id, r.fingerprint, r.certificate, r.subject, r.not_after)
         for r in store.list_roots()]
verified = packs.verify_pack(data, signature, roots, dt.datetime.now(dt.UTC))
stock.INSERT_BATCH = 1
batches = 0
execute = Session.execute
def dying(self, statement, *args, **kwargs):
    global batches
    if getattr(statement, "table", None) is not None and statement.table.name == "stock_card":
        batches += 1
        if batches == 2:
            print("killed", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    return execute(self, statement, *args, **kwargs)
Session.execute = dying
store.import_pack(verified, file_name="pack.csv", actor="child",
                  check_shared_primes=packs.check_shared_primes)
"""


@pytest.fixture(scope="module")
def root() -> S.Root:
    return S.make_root(PROVIDER)


@pytest.fixture(scope="module")
def device_keys() -> S.DeviceKeys:
    return S.DeviceKeys()


def trust(store: Store, root: S.Root) -> list[packs.Root]:
    store.trust_root(packs.check_root(root.der, S.now()), ACTOR)
    return [packs.Root(r.provider_id, r.fingerprint, r.certificate, r.subject, r.not_after)
            for r in store.list_roots()]


def verified_pack(store: Store, root: S.Root, keys: S.DeviceKeys, serial: str,
                  count: int) -> packs.VerifiedPack:
    rows = [S.card_row(root, f"{serial}-{i:03d}", key)
            for i, key in enumerate(keys.take(count), start=1)]
    pack = S.make_pack(root, serial, rows)
    return packs.verify_pack(pack.data, pack.signature, trust(store, root), S.now())


def do_import(store: Store, pack: packs.VerifiedPack):
    return store.import_pack(pack, file_name=f"{pack.header.pack_serial}.csv", actor=ACTOR,
                             check_shared_primes=packs.check_shared_primes)


def in_stock(store: Store) -> dict[str, dict[StockState, int]]:
    return {p.pack_serial: p.counts for p in store.stock_counts()}


def test_cards_are_reserved_first_in_first_out(store: Store, root: S.Root,
                                               device_keys: S.DeviceKeys) -> None:
    first = do_import(store, verified_pack(store, root, device_keys, "PK-B", 3))
    second = do_import(store, verified_pack(store, root, device_keys, "PK-A", 2))
    assert first.import_order < second.import_order

    taken = store.reserve_cards(2, "issuance")
    assert [c.serial for c in taken] == ["PK-B-001", "PK-B-002"]
    assert all(c.state is StockState.RESERVED and c.device_certificate for c in taken)
    taken = store.reserve_cards(2, "issuance")
    # The older pack's last card before the newer pack's first, whatever their serials.
    assert [c.serial for c in taken] == ["PK-B-003", "PK-A-001"]
    with pytest.raises(FailedPrecondition, match="2 cards asked for, 1 in stock"):
        store.reserve_cards(2, "issuance")
    counts = in_stock(store)
    assert counts["PK-B"][StockState.RESERVED] == 3 and counts["PK-B"][StockState.IN_STOCK] == 0
    assert counts["PK-A"][StockState.RESERVED] == 1 and counts["PK-A"][StockState.IN_STOCK] == 1


def test_the_same_pack_again_changes_nothing(store: Store, root: S.Root,
                                             device_keys: S.DeviceKeys) -> None:
    pack = verified_pack(store, root, device_keys, "PK-1", 2)
    do_import(store, pack)
    with pytest.raises(AlreadyExists, match="pack PK-1 already imported"):
        do_import(store, pack)
    assert len(store.list_packs()) == 1
    assert in_stock(store)["PK-1"][StockState.IN_STOCK] == 2


def test_an_error_mid_import_leaves_nothing(store: Store, root: S.Root,
                                            device_keys: S.DeviceKeys,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pack = verified_pack(store, root, device_keys, "PK-1", 3)
    monkeypatch.setattr(stock_module, "INSERT_BATCH", 1)
    batches: list[int] = []

    original = stock_module._card_values

    def values(card, pack_id, now):
        batches.append(card.position)
        if card.position == 3:
            raise RuntimeError("the disk is full")
        return original(card, pack_id, now)

    monkeypatch.setattr(stock_module, "_card_values", values)
    with pytest.raises(RuntimeError, match="disk is full"):
        do_import(store, pack)
    assert batches == [1, 2, 3]                      # two cards had gone to the database
    assert store.list_packs() == [] and store.stock_counts() == []
    monkeypatch.setattr(stock_module, "_card_values", original)
    do_import(store, pack)                            # and the pack can be imported after
    assert in_stock(store)["PK-1"][StockState.IN_STOCK] == 3


def test_a_kill_mid_import_leaves_nothing(database_url: str, root: S.Root,
                                          device_keys: S.DeviceKeys, tmp_path: Path) -> None:
    with Store.from_url(database_url) as store:
        trust(store, root)
    rows = [S.card_row(root, f"PK-K-{i:03d}", key)
            for i, key in enumerate(device_keys.take(3), start=1)]
    pack = S.make_pack(root, "PK-K", rows)
    (tmp_path / "pack.csv").write_bytes(pack.data)
    (tmp_path / "pack.csv.p7s").write_bytes(pack.signature)

    child = subprocess.run([sys.executable, "-c", KILLED_CHILD, database_url, str(tmp_path)],
                           capture_output=True, text=True, timeout=120, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)})

    assert child.returncode == -signal.SIGKILL, child.stderr
    assert child.stdout.strip() == "killed"
    with Store.from_url(database_url) as reopened:
        assert reopened.list_packs() == [] and reopened.stock_counts() == []
        verified = packs.verify_pack(pack.data, pack.signature, trust(reopened, root), S.now())
        do_import(reopened, verified)
        assert in_stock(reopened)["PK-K"][StockState.IN_STOCK] == 3


def test_trusting_a_root_twice_keeps_one_record(store: Store, root: S.Root) -> None:
    checked = packs.check_root(root.der, S.now())
    first, added = store.trust_root(checked, ACTOR)
    again, added_again = store.trust_root(checked, "someone else")
    assert added and not added_again and again == first
    assert [r.fingerprint for r in store.list_roots()] == [checked.fingerprint]
