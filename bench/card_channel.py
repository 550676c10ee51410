"""Card channel benchmark: APDU round trip through pcscd + vpcd, server CPU per card.

Prints one JSON object. ``apdu_round_trip_ms`` is measured from pyscard
through a private pcscd (its own mount namespace, as the tests run it) and
Debian's vsmartcard vpcd reader to a ``cms card virtual`` card process:
p50/p99/mean over ``--apdus`` GET DATA (CPLC) commands, after a warm-up. An
APDU the card answers in microseconds costs what the PC/SC stack costs, which
is the floor under every step of a card session.

``server_cpu_ms_per_card``: a stack from ``cms dev up`` (proxy over SoftHSM2,
mutual TLS); for each of ``--cards`` in-process virtual cards the client does
what the access server does for one PUT KEY: INITIALIZE UPDATE on the card,
one ``OpenSecureChannel`` (transport keys diversified in the HSM, EXTERNAL
AUTHENTICATE and a PUT KEY of an MK set wrapped under the card's DEK), the
card runs the two commands, one ``UnwrapResponses`` (R-MAC checked, channel
released). CPU is read from /proc for the proxy's frontend and worker
processes; the client's own CPU (gRPC client plus the virtual card) is given
beside it.

Usage: .venv/bin/python bench/card_channel.py [--apdus 500] [--cards 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cardcore import gp  # noqa: E402

GET_CPLC = gp.get_data_command(gp.TAG_CPLC)
WARM_UP = 20


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def apdu_round_trip(apdus: int) -> dict[str, float]:
    from tests.support.pcsc import PrivatePcscd, transmit_fn

    workdir = Path(tempfile.mkdtemp(prefix="cms-bench-card-"))
    state = workdir / "card.json"
    cms = [sys.executable, "-m", "cms.cli"]
    subprocess.run([*cms, "card", "init", "--state", str(state), "--transport-keys", "default"],
                   check=True, capture_output=True, timeout=60)
    with PrivatePcscd() as daemon:
        daemon.use_in_this_process()
        card = subprocess.Popen([*cms, "card", "virtual", "--state", str(state),
                                 "--vpcd", daemon.vpcd_endpoint(0)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            conn = daemon.connect(timeout=15)
            transmit = transmit_fn(conn)
            transmit(gp.select_command())
            for _ in range(WARM_UP):
                transmit(GET_CPLC)
            samples = []
            for _ in range(apdus):
                start = time.perf_counter()
                response = transmit(GET_CPLC)
                samples.append((time.perf_counter() - start) * 1000)
                if response[-2:] != b"\x90\x00":
                    raise RuntimeError(f"card answered {response[-2:].hex()}")
            conn.disconnect()
            conn.release()          # before the daemon goes, not in a finalizer after it
        finally:
            card.terminate()
            card.wait(timeout=10)
    return {"p50": round(_percentile(samples, 0.50), 3),
            "p99": round(_percentile(samples, 0.99), 3),
            "mean": round(statistics.fmean(samples), 3),
            "count": apdus}


def _proc_cpu_seconds(pid: int) -> float:
    """User + system CPU of one process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        for child in children:
            out += _tree(int(child))
    return out


def server_cpu_per_card(cards: int) -> dict[str, float]:
    from cardcore.apdu import parse_command
    from cardcore.processor import apdu_link
    from cardcore.psd import Kvn, mk_kvn, psd_id_bytes
    from cardcore.sw import SW
    from cms.keynames import FACTORY_TRANSPORT_MASTER, HSM1_TOKEN, mk_label
    from cms.runtime.client import load_endpoints
    from cms.v1 import card_keys_pb2 as kpb
    from cms.v1 import card_keys_pb2_grpc
    from tests.support.card_keys import provision
    from tests.support.launcher import dev_stack
    from virtual_psd.card import VirtualCard
    from virtual_psd.factory import new_card_state

    master = os.urandom(16)
    workdir = Path(tempfile.mkdtemp(prefix="cms-bench-keys-"))
    with dev_stack(workdir / "stack") as endpoints:
        provision(endpoints, master)
        proxy_pid = int((workdir / "stack" / "run" / "hsm_proxy.pid").read_text())
        stub = card_keys_pb2_grpc.CardKeysStub(
            load_endpoints(endpoints).channel("hsm_proxy", "access-server"))
        states = [new_card_state(transport_master=master) for _ in range(cards + 5)]

        def one(state) -> None:
            card = VirtualCard(state, None)
            card.power_on()
            # The same plain stack the card agent relays through.
            link = apdu_link(card.transmit)
            link.send(parse_command(gp.select_command()))
            challenge = os.urandom(8)
            iu = link.send(parse_command(
                gp.initialize_update_command(Kvn.TRANSPORT, challenge))).data
            element = psd_id_bytes(state.psd_id)
            opened = stub.OpenSecureChannel(kpb.OpenSecureChannelRequest(
                key_set=kpb.KeySetSpec(token=HSM1_TOKEN, key_length=16, diversified=kpb.Diversified(
                    master_label=FACTORY_TRANSPORT_MASTER, element=element)),
                kvn=Kvn.TRANSPORT, host_challenge=challenge, initialize_update_response=iu,
                security_level=0x33, commands=[kpb.ChannelCommand(put_key_set=kpb.PutKeySet(
                    key_set=kpb.KeySetSpec(token=HSM1_TOKEN, key_length=16,
                                           diversified=kpb.Diversified(master_label=mk_label(1),
                                                                       element=element)),
                    new_kvn=mk_kvn(1)))]), timeout=30)
            from cms.v1 import card_channel_pb2 as cpb

            answers = []
            for command in opened.commands:
                answer = link.send(parse_command(command.apdu))
                answers.append(cpb.ApduResponse(data=answer.data, sw=answer.sw))
            stub.UnwrapResponses(kpb.UnwrapResponsesRequest(
                channel=opened.channel, responses=answers, close=True), timeout=30)
            if answers[-1].sw != SW.OK:
                raise RuntimeError(f"PUT KEY answered {answers[-1].sw:04X}")

        for state in states[:5]:                      # warm-up: connections, key caches
            one(state)
        pids = _tree(proxy_pid)
        proxy_before = sum(_proc_cpu_seconds(p) for p in pids)
        client_before = time.process_time()
        wall = time.perf_counter()
        for state in states[5:]:
            one(state)
        wall = time.perf_counter() - wall
        proxy_cpu = sum(_proc_cpu_seconds(p) for p in pids) - proxy_before
        client_cpu = time.process_time() - client_before
    return {"proxy_cpu_ms_per_card": round(1000 * proxy_cpu / cards, 3),
            "client_cpu_ms_per_card (gRPC client + virtual card)":
                round(1000 * client_cpu / cards, 3),
            "cards": cards, "cards_per_second_one_client": round(cards / wall, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apdus", type=int, default=500)
    parser.add_argument("--cards", type=int, default=200)
    args = parser.parse_args(argv)
    if args.apdus < 1 or args.cards < 1:
        parser.error("--apdus and --cards must be at least 1")
    result = {
        "apdu_round_trip_ms": apdu_round_trip(args.apdus),
        "server_cpu_ms_per_card_open_scp03_and_put_key": server_cpu_per_card(args.cards),
        "path": "pyscard -> private pcscd -> vpcd -> cms card virtual (loopback TCP)",
        "cores": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
