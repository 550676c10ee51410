"""Registry cost of one campaign contact (flow A2), without gRPC or HSM.

Prints one JSON object: CPU and wall milliseconds per contact on a SQLite file
(``synchronous=FULL``, as the access server runs it), two ways side by side in
one run over fresh cards:

- ``read_then_journal``: what a contact does now: ``read_contact`` (a read
  transaction; the card then proves its keys to the proxy), ``start_contact``
  takes the lease and journals the campaign replacement in one transaction,
  then ``complete_replacement`` (two write transactions);
- ``journal_apart``: ``start_contact`` without journaling, then
  ``begin_replacement``, then ``complete_replacement`` (three);

and ``ratio`` = journal_apart CPU / read_then_journal CPU.

Usage: .venv/bin/python bench/store_contact.py [--cards 500]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from access_server.store import Store  # noqa: E402

ACTOR = "bench"
HOLDER = "bench-agent"


def _fleet(store: Store, prefix: str, cards: int) -> list[str]:
    ids = [f"{prefix}{i:018d}" for i in range(cards)]
    store.register_psds(ids, ACTOR)
    for psd_id in ids:
        intent = store.begin_install(psd_id, cryptogram=os.urandom(256),
                                     cryptogram_key_label="cryptogram/1",
                                     mkrk_version=1, mk_version=2, actor=ACTOR)
        store.complete_install(psd_id, intent.intent_id, ACTOR)
    store.start_campaign(f"bench {prefix}", 2, 1, psd_id_prefix=prefix, actor=ACTOR)
    return ids


def _read_then_journal(store: Store, psd_id: str) -> None:
    seen = store.read_contact(psd_id, HOLDER)
    start = store.start_contact(psd_id, HOLDER, 60, seen=seen, journal=True, actor=ACTOR)
    assert start.intent_begun and start.intent is not None
    store.complete_replacement(psd_id, start.intent.intent_id, ACTOR, release_lease_of=HOLDER)


def _apart(store: Store, psd_id: str) -> None:
    start = store.start_contact(psd_id, HOLDER, 60)
    assert start.work is not None
    intent = store.begin_replacement(psd_id, from_version=2, to_version=1,
                                     campaign_id=start.work.campaign_id, actor=ACTOR)
    store.complete_replacement(psd_id, intent.intent_id, ACTOR, release_lease_of=HOLDER)


def _measure(store: Store, ids: list[str], contact) -> dict[str, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    for psd_id in ids:
        contact(store, psd_id)
    return {"cpu_ms": round(1000 * (time.process_time() - cpu) / len(ids), 3),
            "wall_ms": round(1000 * (time.perf_counter() - wall) / len(ids), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=int, default=500)
    args = parser.parse_args(argv)
    if args.cards < 2:
        parser.error("--cards must be at least 2 (the run alternates two halves)")
    with tempfile.TemporaryDirectory(prefix="cms-bench-store-") as directory, \
            Store.from_url(f"sqlite:///{directory}/registry.db") as store:
        read_ids, apart_ids = _fleet(store, "AA", args.cards), _fleet(store, "BB", args.cards)
        # Alternate halves so a drift of the machine's speed hits both ways alike.
        half = args.cards // 2
        results = {"read_then_journal": [], "journal_apart": []}
        for lo in (0, half):
            results["read_then_journal"].append(
                _measure(store, read_ids[lo:lo + half], _read_then_journal))
            results["journal_apart"].append(
                _measure(store, apart_ids[lo:lo + half], _apart))
    summary = {name: {k: round(sum(r[k] for r in runs) / len(runs), 3) for k in runs[0]}
               for name, runs in results.items()}
    print(json.dumps({
        "cards": args.cards, **summary,
        "ratio": round(summary["journal_apart"]["cpu_ms"]
                       / summary["read_then_journal"]["cpu_ms"], 2),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
