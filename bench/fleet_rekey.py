"""Fleet master key replacement benchmark (flow A2 over many cards).

Prints one JSON object:

- ``cards_per_second``: a campaign MK v2 -> v1 over ``--cards`` in-process
  virtual cards (installed with A1 beforehand, not timed), driven by
  ``--concurrency`` agents over the real gRPC CardChannel stream to a real
  access server process and a real proxy process (``cms dev up``, SoftHSM2,
  mutual TLS, SQLite);
- ``hsm_only_cards_per_second``: the HSM operations of one replacement, done
  directly with python-pkcs11 on a SoftHSM2 token in this process, in the same
  run: RSA-OAEP decrypt of the cryptogram, 3 derives of the MKRK set, 3
  derives of the new MK set, 4 AES-CMACs for the session keys, 3 C_WrapKey of
  the new keys under the DEK, 3 KCV encryptions, on persistent keys like
  HSM1's, measured just before and just after the campaign
  (``hsm_only_before_after``; their mean is used); and ``ratio`` of the two;
- ``cpu_ms_per_card``: CPU time per replacement of the access server, the
  proxy (with its worker processes) and this process (agents and virtual
  cards), measured over the campaign; ``cpu_ceiling_cards_per_second`` is
  what this machine's cores allow at that cost, whatever the concurrency;
- ``round_trips_per_replacement``: agent <-> server scripts per card;
- ``latency_ms``: one replacement at a time through a TCP relay adding
  ``--rtt-ms`` of round-trip time between agent and access server
  (bench/relay.py, in a process of its own; the kernel here has no netem),
  p50 and p99: ``warm`` on
  an agent's open connection (the replacement itself), ``cold`` with a new
  connection per replacement (adding the TCP and TLS handshakes).

Usage: .venv/bin/python bench/fleet_rekey.py [--cards 1000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.relay import RelayProcess  # noqa: E402
from card_agent.session import AgentInfo, run_session_async  # noqa: E402
from cms.identity import ACCESS_SERVER, identity_channel_options  # noqa: E402
from cms.runtime.client import load_endpoints  # noqa: E402
from cms.runtime.tls import channel_credentials  # noqa: E402
from cms.v1 import access_pb2 as apb  # noqa: E402
from cms.v1 import access_pb2_grpc  # noqa: E402
from cms.v1 import card_channel_pb2 as pb  # noqa: E402
from virtual_psd.agent_source import VirtualTransport  # noqa: E402
from virtual_psd.card import VirtualCard  # noqa: E402
from virtual_psd.factory import new_card_state  # noqa: E402

MASTER = os.urandom(16)
STATION = AgentInfo(role=pb.PERSONALIZATION_STATION, label="bench-station")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
HSM_ONLY_SECONDS = 4.0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _with_children(pid: int) -> list[int]:
    found = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _contacts(endpoints: Path, cards: list[VirtualCard], role: int, concurrency: int,
                    target: str | None = None) -> tuple[list[float], list[int]]:
    """One contact per card, ``concurrency`` at a time; durations and scripts per contact."""
    import grpc

    ep = load_endpoints(endpoints)
    files = ep.tls("card-agent")
    address = target or ep.grpc_address("access_server")
    channel = grpc.aio.secure_channel(address, channel_credentials(files),
                                      options=identity_channel_options(ACCESS_SERVER))
    queue: asyncio.Queue[VirtualCard] = asyncio.Queue()
    for card in cards:
        queue.put_nowait(card)
    durations: list[float] = []
    scripts: list[int] = []
    failures: list[str] = []

    async def agent(index: int) -> None:
        info = AgentInfo(role=role, label=f"bench-{index}")
        while not queue.empty():
            card = queue.get_nowait()
            start = time.perf_counter()
            report = await run_session_async(VirtualTransport(card), channel, info,
                                              deadline_s=120)
            durations.append(time.perf_counter() - start)
            scripts.append(report.scripts_run)
            if not report.ok:
                failures.append(report.done.message if report.done else report.error)

    await asyncio.gather(*(agent(i) for i in range(concurrency)))
    await channel.close()
    if failures:
        raise RuntimeError(f"{len(failures)} contacts failed, e.g. {failures[0]}")
    return durations, scripts


def hsm_only(seconds: float, workdir: Path) -> float:
    """Replacements per second of the HSM work alone (one process, direct PKCS#11)."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    from cardcore.diversify import derivation_data
    from deploy.softhsm import SoftHsm, find_module

    hsm = SoftHsm(workdir / "hsm-only").ensure()
    hsm.init_token("bench")
    os.environ.update(hsm.env())        # this process loads SoftHSM2 only here
    token = pkcs11.lib(find_module()).get_token(token_label="bench")
    with token.open(user_pin=hsm.pin_file("bench").read_text().strip(), rw=True) as session:
        # Like HSM1's key blocks: persistent token objects, sensitive and not extractable.
        block = session.generate_key(KeyType.AES, 128, store=True, label="mk-block",
                                     template={Attribute.DERIVE: True,
                                               Attribute.SENSITIVE: True,
                                               Attribute.EXTRACTABLE: False})
        public, private = session.generate_keypair(
            KeyType.RSA, 2048, store=True, label="cryptogram",
            private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
        r = os.urandom(16)
        cryptogram = public.encrypt(r, mechanism=Mechanism.RSA_PKCS_OAEP,
                                    mechanism_param=(Mechanism.SHA_1, pkcs11.MGF.SHA1, None))
        template = {Attribute.TOKEN: False, Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: True, Attribute.ENCRYPT: True, Attribute.SIGN: True,
                    Attribute.WRAP: True, Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.AES, Attribute.VALUE_LEN: 16}

        def derive_set(element: bytes) -> list:
            return [block.derive_key(KeyType.AES, 128, mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
                                     mechanism_param=derivation_data(element, i, 16),
                                     template=template) for i in (1, 2, 3)]

        done = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            recovered = private.decrypt(cryptogram, mechanism=Mechanism.RSA_PKCS_OAEP,
                                        mechanism_param=(Mechanism.SHA_1, pkcs11.MGF.SHA1, None))
            mkrk = derive_set(recovered)
            new = derive_set(b"0123456789")
            for _ in range(2):
                mkrk[0].sign(bytes(32), mechanism=Mechanism.AES_CMAC)
                mkrk[1].sign(bytes(32), mechanism=Mechanism.AES_CMAC)
            for key in new:
                mkrk[2].wrap_key(key, mechanism=Mechanism.AES_CBC, mechanism_param=bytes(16))
                key.encrypt(b"\x01" * 16, mechanism=Mechanism.AES_ECB)
            for key in (*mkrk, *new):
                key.destroy()
            done += 1
        return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--latency-samples", type=int, default=20)
    args = parser.parse_args(argv)
    if args.cards < 1 or args.concurrency < 1:
        parser.error("--cards and --concurrency must be at least 1")

    from tests.support.card_keys import provision
    from tests.support.launcher import cms, dev_stack

    workdir = Path(tempfile.mkdtemp(prefix="cms-bench-fleet-"))
    with dev_stack(workdir / "stack") as endpoints:
        provision(endpoints, MASTER)
        total = args.cards + 2 * args.latency_samples + 1
        cards = [VirtualCard(new_card_state(transport_master=MASTER)) for _ in range(total)]
        channel = load_endpoints(endpoints).channel("access_server", "admin")
        registry = access_pb2_grpc.PsdRegistryStub(channel)
        ids = [c.state.psd_id for c in cards]
        for i in range(0, len(ids), 500):
            registry.RegisterPsds(apb.RegisterPsdsRequest(psd_ids=ids[i:i + 500]), timeout=120)
        asyncio.run(_contacts(endpoints, cards, pb.PERSONALIZATION_STATION, args.concurrency))
        cms("campaign", "--endpoints", str(endpoints), "start", "--from-version", "2",
            "--to-version", "1")
        fleet = cards[:args.cards]
        warm_cards = cards[args.cards:args.cards + args.latency_samples + 1]
        cold_cards = cards[args.cards + args.latency_samples + 1:]

        # This machine's speed drifts by tens of percent from one minute to
        # the next: the HSM-only rate is measured just before and just after
        # the campaign, and the ratio uses their mean.
        hsm_before = hsm_only(HSM_ONLY_SECONDS, workdir)
        run_dir = workdir / "stack" / "run"
        processes = {name: _with_children(int((run_dir / f"{name}.pid").read_text()))
                     for name in ("access_server", "hsm_proxy")}
        cpu_before = {n: sum(_cpu_seconds(p) for p in pids) for n, pids in processes.items()}
        own_before = time.process_time()
        start = time.perf_counter()
        _, scripts = asyncio.run(_contacts(endpoints, fleet, pb.USER_PC, args.concurrency))
        rate = args.cards / (time.perf_counter() - start)
        cpu_ms = {n: round(1000 * (sum(_cpu_seconds(p) for p in pids) - cpu_before[n])
                           / args.cards, 2) for n, pids in processes.items()}
        cpu_ms["agents_and_cards"] = round(1000 * (time.process_time() - own_before)
                                           / args.cards, 2)
        hsm_after = hsm_only(HSM_ONLY_SECONDS, workdir)

        address = load_endpoints(endpoints).grpc_address("access_server")
        host, _, port = address.rpartition(":")
        # The relay runs in a process of its own, like a network between the
        # agent and the server: not competing for this process's interpreter.
        with RelayProcess((host, int(port)), args.rtt_ms / 1000) as relay:
            target = f"127.0.0.1:{relay.address[1]}"
            # One connection for all: the first contact opens it, the rest are warm.
            warm, _ = asyncio.run(_contacts(endpoints, warm_cards, pb.USER_PC, 1,
                                            target=target))
            warm = warm[1:]
            cold = []
            for card in cold_cards:
                once, _ = asyncio.run(_contacts(endpoints, [card], pb.USER_PC, 1,
                                                target=target))
                cold += once
        channel.close()
    hsm_rate = (hsm_before + hsm_after) / 2

    def summary(samples: list[float]) -> dict[str, float]:
        ms = [d * 1000 for d in samples]
        return {"p50": round(_percentile(ms, 0.5), 1), "p99": round(_percentile(ms, 0.99), 1)}

    print(json.dumps({
        "cards": args.cards, "concurrency": args.concurrency, "cores": os.cpu_count(),
        "cards_per_second": round(rate, 1),
        "hsm_only_cards_per_second": round(hsm_rate, 1),
        "hsm_only_before_after": [round(hsm_before, 1), round(hsm_after, 1)],
        "ratio": round(rate / hsm_rate, 3),
        "cpu_ms_per_card": cpu_ms,
        "cpu_ceiling_cards_per_second": round(
            1000 * (os.cpu_count() or 1) / sum(cpu_ms.values()), 1),
        "round_trips_per_replacement": statistics.mode(scripts),
        "latency_ms": {"rtt_ms": args.rtt_ms, "warm": summary(warm), "cold": summary(cold),
                       "target": round(3 * args.rtt_ms + 50, 1)},
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
