"""``cms demo``: seed 000 end to end on the embedded default, then seed 004's flow B.

What an operator and a card would live through, on one machine:

1. the local stack comes up (SoftHSM2 tokens ``access`` = HSM1 and ``kms`` =
   HSM2, development PKI, proxy, key management, access server, SQLite);
2. key management generates the MK, MKRK and cryptogram key blocks in HSM2,
   two custodians build a transport key from their components, and the
   blocks travel to HSM1 wrapped under it (claims 16, 27, 28); the card
   factory's transport master arrives by a second ceremony;
3. a virtual card is plugged into a PC/SC reader (a private pcscd with the
   vsmartcard reader) and a personalization station's card agent installs
   the MKRK and MK key sets (flow A1);
4. a new MK version is made and transferred, a campaign targets the card,
   and a user PC's card agent replaces the MK through a channel opened with
   the MKRK key set (flow A2), printing each seed step;
5. a campaign replaces the MK of a few dozen in-process virtual cards whose
   agents connect concurrently, with a progress bar;
6. seed 004, B1-B2: the issuer system makes its issuer key in its HSM, the
   provider system its root in its own, and the provider initializes a pack
   of user devices (one through PC/SC, driven by a card agent that dials the
   provider, the rest in process); the issuer trusts the provider root and
   imports the device initialization data into its stock;
7. seed 004, B3-B5: the issuer system adds users and issues three of the stock's
   cards to them (device authentication key pairs in the issuer system HSM, user
   keys derived and sealed in the issuer HSM, the personalization file signed
   with the issuer key); the bureau personalizes them through card agents (one
   card in a PC/SC reader) and makes PIN and PUK, the mailing house prints the
   letters, the results return to the issuer; the first card, with the PIN read
   back from its letter, signs with its user key, and it and the issuer
   authenticate each other; a fourth card is issued online and personalized on
   its user's PC with the activation code.

The demo can run again on the same directory: each run makes new MK versions,
new cards, packs, users and issuances, and reuses the rest (the issuer key, the
provider root, the seed, the KEK, the bureau's and the mailing house's keys).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from cardcore.psd import GP_DEFAULT_KEY
from cms.identity import PROVIDER
from cms.keynames import (
    FACTORY_TRANSPORT_MASTER,
    HSM1_TOKEN,
    HSM2_TOKEN,
    ISSUER_TOKEN,
    PROVIDER_TOKEN,
    transport_label,
)

# The card factory's transport master for demo cards: the GlobalPlatform test
# key 40..4F (public, as any transport master of a demo must be).
DEMO_TRANSPORT_MASTER = GP_DEFAULT_KEY
FLEET_CARDS = 30
FLEET_AGENTS = 8
PACK_CARDS = 4
ISSUED_CARDS = 4   # three to the bureau, one to a user's own PC
DEMO_PROVIDER_ID = "demo-provider"


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run the demo of seed 000 and seed 004's flow B on a "
                                        "local stack")
    demo.add_argument("--dir", type=Path, default=Path("var/demo"),
                      help="state directory of the local stack (default: var/demo)")
    demo.add_argument("--cards", type=int, default=FLEET_CARDS,
                      help=f"cards in the campaign at the end (default {FLEET_CARDS})")
    demo.add_argument("--pack-cards", type=int, default=PACK_CARDS,
                      help=f"user devices the provider initializes (default {PACK_CARDS})")
    demo.add_argument("--no-pcsc", action="store_true",
                      help="talk to the demo cards in-process instead of through PC/SC")
    demo.add_argument("--keep-running", action="store_true",
                      help="leave the services running at the end")
    demo.set_defaults(func=_run)


def _say(step: str, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


def _run(args: argparse.Namespace) -> int:
    from cms.runtime.cli_error import CliError
    from deploy.local import down, up

    if not 1 <= args.cards <= 1000:
        raise CliError("--cards: 1 to 1000")
    if not ISSUED_CARDS <= args.pack_cards <= 100:
        raise CliError(f"--pack-cards: {ISSUED_CARDS} to 100")
    _say("stack", f"bringing up the local stack in {args.dir.resolve()}")
    endpoints_path = up(args.dir)
    try:
        demo = Demo(endpoints_path, args.dir.resolve())
        demo.stack_tour()
        demo.key_blocks()
        demo.card_over_pcsc(use_pcsc=not args.no_pcsc)
        demo.fleet_campaign(args.cards)
        demo.metrics()
        stock = StockDemo(demo)
        stock.run(args.pack_cards, use_pcsc=not args.no_pcsc)
        IssuanceDemo(demo, stock).run(use_pcsc=not args.no_pcsc)
    finally:
        if args.keep_running:
            _say("stack", f"left running; stop with: cms dev down --dir {args.dir}")
        else:
            stopped = down(args.dir)
            _say("stack", "stopped " + ", ".join(stopped))
    return 0


def _kcv(key: bytes) -> bytes:
    from cardcore.kcv import kcv_zero_block

    return kcv_zero_block(key)


class Demo:
    def __init__(self, endpoints_path: Path, directory: Path) -> None:
        from cms.runtime.client import load_endpoints
        from cms.v1 import access_pb2_grpc, hsm_pb2_grpc, key_mgmt_pb2_grpc

        self.endpoints_path = endpoints_path
        self.directory = directory
        self.endpoints = load_endpoints(endpoints_path)
        self.keys = key_mgmt_pb2_grpc.KeyManagementStub(self.endpoints.channel("key_mgmt",
                                                                               "admin"))
        self.hsm = hsm_pb2_grpc.HsmStub(self.endpoints.channel("hsm_proxy", "admin"))
        access = self.endpoints.channel("access_server", "admin")
        self.registry = access_pb2_grpc.PsdRegistryStub(access)
        self.campaigns = access_pb2_grpc.CampaignsStub(access)
        self.cards_dir = directory / "cards"
        self.cards_dir.mkdir(exist_ok=True)
        self.run_id = time.strftime("%Y%m%d-%H%M%S")

    # -- 1. the stack ---------------------------------------------------------------
    def stack_tour(self) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from cms.v1 import hsm_pb2 as hpb

        for name, entry in self.endpoints.data["services"].items():
            status = health_pb2_grpc.HealthStub(self.endpoints.channel(name, "admin")).Check(
                health_pb2.HealthCheckRequest(), timeout=10).status
            _say("stack", f"{name}: grpc {entry['grpc']} (mutual TLS), "
                 f"{health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
        for token in self.hsm.ListTokens(hpb.ListTokensRequest(), timeout=10).tokens:
            role = {HSM1_TOKEN: "HSM1", HSM2_TOKEN: "HSM2"}.get(token.label, "")
            _say("hsm", f"token {token.label!r} ({role}, {token.manufacturer} {token.model})")

    # -- 2. key blocks, ceremonies, transfer -------------------------------------------------
    def new_block(self, kind: int) -> Any:
        from cms.v1 import key_mgmt_pb2 as pb

        block = self.keys.CreateKeyBlock(pb.CreateKeyBlockRequest(kind=kind), timeout=120)
        _say("HSM2", f"generated {block.label} (KCV {block.kcv.hex()}): sensitive, "
             f"extractable only under a trusted transport key")
        return block

    def ceremony(self, label: str, key: bytes | None, purpose: int = 0) -> None:
        """Key management begins a ceremony; two custodians, each under a certificate of
        their own, enter one component each straight to the HSM proxy (key management never
        sees one). With ``key``, the components XOR to it."""
        from cms.v1 import key_blocks_pb2 as bpb
        from cms.v1 import key_blocks_pb2_grpc
        from cms.v1 import key_mgmt_pb2 as pb

        first = os.urandom(16)
        second = os.urandom(16) if key is None else bytes(a ^ b for a, b in zip(first, key,
                                                                                strict=True))
        c = self.keys.StartCeremony(pb.StartCeremonyRequest(label=label, components=2,
                                                            purpose=purpose), timeout=30)
        _say("ceremony", f"{label}: key management began ceremony {c.ceremony_id} in the HSM "
             f"proxy; it waits for 2 components")
        for custodian, component in (("custodian-1", first), ("custodian-2", second)):
            channel = self.endpoints.channel("hsm_proxy", custodian)
            try:
                done = key_blocks_pb2_grpc.KeyBlocksStub(channel).AddComponent(
                    bpb.AddComponentRequest(ceremony_id=c.ceremony_id, component=component,
                                            kcv=_kcv(component)), timeout=30)
            finally:
                channel.close()
            _say("ceremony", f"{custodian} entered a component straight to the proxy (KCV "
                 f"{_kcv(component).hex()}), {done.received}/{done.needed}")
        c = self.keys.GetCeremony(pb.GetCeremonyRequest(ceremony_id=c.ceremony_id), timeout=30)
        for k in c.kcvs:
            _say("ceremony", f"{label} combined in {k.token}: KCV {k.kcv.hex()}")

    def transfer(self, transport: str, labels: list[str]) -> None:
        from cms.v1 import key_mgmt_pb2 as pb

        reply = self.keys.TransferKeyBlocks(pb.TransferKeyBlocksRequest(
            transport_label=transport, labels=labels), timeout=300)
        for b in reply.blocks:
            what = "already in HSM1" if b.already_present else "wrapped in HSM2, unwrapped in HSM1"
            _say("transfer", f"{b.label}: {what}, KCV {b.kcv_hsm1.hex()} = {b.kcv_hsm2.hex()}")

    def key_blocks(self) -> None:
        from cms.v1 import hsm_pb2 as hpb
        from cms.v1 import key_mgmt_pb2 as pb

        existing = {b.label: b for b in self.keys.ListKeyBlocks(pb.ListKeyBlocksRequest(),
                                                                timeout=30).blocks}
        kinds = {b.kind for b in existing.values()}
        labels = [self.new_block(pb.MK).label]
        for kind in (pb.MKRK, pb.CRYPTOGRAM_KEY_PAIR):
            if kind not in kinds:
                labels.append(self.new_block(kind).label)
        labels += [label for label, b in existing.items() if not b.in_hsm1]
        self.transport = transport_label(f"demo-{self.run_id}")
        self.ceremony(self.transport, None)
        self.transfer(self.transport, labels)
        try:
            master = self.hsm.GetKeyAttributes(hpb.GetKeyAttributesRequest(
                key=hpb.KeyRef(token=HSM1_TOKEN, label=FACTORY_TRANSPORT_MASTER)), timeout=30)
        except Exception:
            master = None
        if master is None:
            self.ceremony(FACTORY_TRANSPORT_MASTER, DEMO_TRANSPORT_MASTER,
                          purpose=pb.TRANSPORT_MASTER)
        elif master.kcv != _kcv(DEMO_TRANSPORT_MASTER):
            from cms.runtime.cli_error import CliError

            raise CliError(f"HSM1's {FACTORY_TRANSPORT_MASTER} is not the demo's; run the demo in "
                           f"a directory of its own (--dir)")
        else:
            _say("ceremony", f"{FACTORY_TRANSPORT_MASTER} already in HSM1 (KCV {master.kcv.hex()})")
        attrs = self.hsm.GetKeyAttributes(hpb.GetKeyAttributesRequest(
            key=hpb.KeyRef(token=HSM1_TOKEN, label=labels[0])), timeout=30)
        _say("HSM1", f"{labels[0]} in HSM1: class {hpb.KeyRole.Name(attrs.role)}, origin "
             f"{hpb.KeyOrigin.Name(attrs.origin)}, sensitive={attrs.sensitive} "
             f"extractable={attrs.extractable} modifiable={attrs.modifiable}")

    # -- 3 and 4. one card through PC/SC ----------------------------------------------------
    def new_card(self, path: Path) -> str:
        from cms.v1 import access_pb2 as apb
        from virtual_psd.factory import create_card

        psd_id = create_card(path, transport_master=DEMO_TRANSPORT_MASTER).psd_id
        reply = self.registry.RegisterPsds(apb.RegisterPsdsRequest(psd_ids=[psd_id]), timeout=30)
        if not reply.added:
            raise RuntimeError(f"PSD {psd_id} was not registered: {reply.results[0].error}")
        return psd_id

    def newest_mk(self) -> int:
        from cms.v1 import key_mgmt_pb2 as pb

        listed = self.keys.ListKeyBlocks(pb.ListKeyBlocksRequest(kind=pb.MK), timeout=30).blocks
        return max(b.version for b in listed if b.in_hsm1)

    def rotate_mk(self) -> int:
        from cms.v1 import key_mgmt_pb2 as pb

        block = self.new_block(pb.MK)
        self.transfer(self.transport, [block.label])
        return block.version

    def card_over_pcsc(self, use_pcsc: bool) -> None:
        from cms.v1 import access_pb2 as apb

        state = self.cards_dir / f"pcsc-{self.run_id}.json"
        psd_id = self.new_card(state)
        _say("card", f"virtual card {psd_id} made by the factory (transport keys diversified "
             f"from {FACTORY_TRANSPORT_MASTER}); registered blank")
        with CardReader(state, use_pcsc) as reader:
            _say("pc/sc", reader.description)
            _say("A1", "personalization station: install the MKRK and MK key sets")
            reader.agent(self.endpoints_path, "station")
            shown = self.registry.GetPsd(apb.GetPsdRequest(psd_id=psd_id), timeout=30)
            old = shown.mk_version
            _say("A1", f"card {psd_id}: active, MK v{old}, MKRK v{shown.mkrk_version}")
            new = self.rotate_mk()
            campaign = self.campaigns.StartCampaign(apb.StartCampaignRequest(
                name=f"demo card {self.run_id}", from_mk_version=old, to_mk_version=new,
                filter=apb.CampaignFilter(psd_ids=[psd_id])), timeout=30)
            _say("A2", f"campaign {campaign.campaign_id}: MK v{old} -> v{new} for this card")
            _say("A2", "the user's PC connects: replace the MK through the MKRK channel")
            reader.agent(self.endpoints_path, "user")
        shown = self.registry.GetPsd(apb.GetPsdRequest(psd_id=psd_id), timeout=30)
        _say("A2", f"card {psd_id}: MK v{shown.mk_version}, MKRK v{shown.mkrk_version}")
        for event in self.registry.GetPsdHistory(apb.GetPsdRequest(psd_id=psd_id),
                                                 timeout=30).events:
            _say("history", f"{event.event}: {event.detail}")

    # -- 5. a campaign over a fleet --------------------------------------------------------
    def fleet_campaign(self, count: int) -> None:
        from cms.v1 import access_pb2 as apb
        from cms.v1 import card_channel_pb2 as cpb

        fleet_dir = self.cards_dir / f"fleet-{self.run_id}"
        fleet_dir.mkdir()
        paths = [fleet_dir / f"card-{i:03d}.json" for i in range(count)]
        ids = [self.new_card(p) for p in paths]
        _say("fleet", f"{count} in-process virtual cards registered; stations install them "
             f"({FLEET_AGENTS} at a time)")
        outcomes = self._contacts(paths, cpb.PERSONALIZATION_STATION)
        _say("fleet", f"installed: {outcomes}")
        old = self.newest_mk()
        new = self.rotate_mk()
        campaign = self.campaigns.StartCampaign(apb.StartCampaignRequest(
            name=f"fleet {self.run_id}", from_mk_version=old, to_mk_version=new,
            filter=apb.CampaignFilter(psd_ids=ids)), timeout=60)
        self.fleet_campaign_id = campaign.campaign_id
        _say("campaign", f"{campaign.campaign_id}: MK v{old} -> v{new} on {campaign.total} "
             f"cards, as their agents connect")
        done = threading.Event()
        results: dict[str, int] = {}

        def run() -> None:
            results.update(self._contacts(paths, cpb.USER_PC))
            done.set()

        worker = threading.Thread(target=run, daemon=True)
        started = time.monotonic()
        worker.start()
        self._progress(campaign.campaign_id, done)
        worker.join()
        elapsed = time.monotonic() - started
        final = self.campaigns.GetCampaign(apb.GetCampaignRequest(
            campaign_id=campaign.campaign_id), timeout=30)
        from access_server.cli import describe_campaign

        _say("campaign", describe_campaign(final))
        _say("campaign", f"agent sessions: {results}; {count / elapsed:.1f} cards/s")

    def _contacts(self, paths: list[Path], role: int) -> dict[str, int]:
        from card_agent.session import AgentInfo, run_session
        from virtual_psd.agent_source import VirtualTransport
        from virtual_psd.card import VirtualCard

        channel = self.endpoints.channel("access_server", "card-agent")
        counts: dict[str, int] = {}
        lock = threading.Lock()

        def one(i_path: tuple[int, Path]) -> None:
            i, path = i_path
            transport = VirtualTransport(VirtualCard.open(path))
            try:
                report = run_session(transport, channel,
                                     AgentInfo(role=role, label=f"demo-{i}"), deadline_s=60)
            finally:
                transport.close()
            with lock:
                counts[report.outcome_name.lower()] = counts.get(
                    report.outcome_name.lower(), 0) + 1

        try:
            with ThreadPoolExecutor(FLEET_AGENTS) as pool:
                list(pool.map(one, enumerate(paths)))
        finally:
            channel.close()
        return counts

    def _progress(self, campaign_id: str, done: threading.Event) -> None:
        from access_server.cli import progress_bar
        from cms.v1 import access_pb2 as apb

        tty = sys.stdout.isatty()
        last = None
        while True:
            c = self.campaigns.GetCampaign(apb.GetCampaignRequest(campaign_id=campaign_id),
                                           timeout=30)
            line = f"{progress_bar(c)} {c.failed} failed"
            if line != last:
                if tty:
                    print(f"\r[campaign] {line}", end="", flush=True)
                else:
                    print(f"[campaign] {line}", flush=True)
                last = line
            if done.is_set():
                # Agents finished: whatever is left stays pending for a later contact.
                break
            time.sleep(0.2)
        if tty:
            print()

    def metrics_text(self) -> str:
        """The access server's metrics page ("" when it serves none)."""
        import urllib.request

        url = self.endpoints.metrics_url("access_server")
        if not url:
            return ""
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (loopback)
            return resp.read().decode()

    def metrics(self) -> None:
        url = self.endpoints.metrics_url("access_server")
        text = self.metrics_text()
        if not text:
            return
        campaign = getattr(self, "fleet_campaign_id", "")
        lines = [ln for ln in text.splitlines()
                 if ln.startswith('cms_grpc_server_handled_total{code="OK",method="Connect"')
                 or (ln.startswith("cms_campaign_cards") and campaign in ln)]
        _say("metrics", f"{url}:")
        for ln in lines[:8]:
            print("    " + ln)


# -- 6. seed 004: provider initialization and the issuer's stock ---------------------------
def _stream(label: str, lines: Any) -> list[str]:
    """Print a command's output lines under ``label`` as they come; the lines."""
    seen = []
    for line in lines:
        seen.append(line.rstrip())
        print(f"    {label} {seen[-1]}", flush=True)
    return seen


def _cms(label: str, *args: str) -> list[str]:
    """Run one ``cms`` command as its operator would, its output shown under ``label``."""
    proc = subprocess.Popen([sys.executable, "-m", "cms.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = _stream(label, proc.stdout)
    if proc.wait(timeout=600) != 0:
        raise RuntimeError(f"cms {args[0]} exited with status {proc.returncode}: "
                           f"{lines[-1] if lines else 'no output'}")
    return lines


@contextmanager
def _serving(label: str, args: list[str]) -> Iterator[tuple[str, Any]]:
    """A ``cms`` command that serves card agents for its run: its first line (where it
    listens) and the rest of its output; waited for at the end, killed if still running."""
    proc = subprocess.Popen([sys.executable, "-m", "cms.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        yield _stream(label, [proc.stdout.readline()])[0], proc.stdout
        if proc.wait(timeout=120) != 0:
            raise RuntimeError(f"cms {args[0]} exited with status {proc.returncode}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _cards(count: int) -> str:
    return f"{count} card{'' if count == 1 else 's'}"


def _key_size(certificate: bytes) -> int:
    from cryptography import x509

    return int(getattr(x509.load_der_x509_certificate(certificate).public_key(), "key_size", 0))


def _row_summary(row: Any) -> str:
    """What a pack row says of its user device: the keys the card generated (their sizes
    read from the root-signed keys) and what the card and the root signed."""
    return (f"user device {row.serial}: device key pair RSA-{_key_size(row.device_certificate)} "
            f"and issuer authentication key pair P-{_key_size(row.issuer_auth_certificate)} "
            "generated on the card, serial number stored, public issuer key injected; "
            "root-signed device key and root-signed issuer authentication key stored on it, "
            f"signed device key ({len(row.signed_device_key)} bytes) made by it")


class StockDemo:
    """B1 and B2: the provider system initializes a pack of user devices, the issuer system
    takes the pack's device initialization data into its stock.

    The provider runs its own commands (``cms provider ...`` under the identity
    ``provider``, its root in the ``provider`` token); the issuer acts as ``admin``
    through the proxy's IssuerKeys and the access server's Stock service. What they
    hand each other (the public issuer key, the root certificate, the packs) lies
    in ``exchange/``.
    """

    def __init__(self, demo: Demo) -> None:
        from cms.v1 import provider_pb2_grpc, stock_pb2_grpc

        self.demo = demo
        self.exchange = demo.directory / "exchange"
        self.exchange.mkdir(exist_ok=True)
        self.issuer_key_pem = self.exchange / "issuer-key.pem"
        self.root_pem = self.exchange / "provider-root.pem"
        self.issuer_keys = provider_pb2_grpc.IssuerKeysStub(
            demo.endpoints.channel("hsm_proxy", "admin"))
        self.stock = stock_pb2_grpc.StockStub(demo.endpoints.channel("access_server", "admin"))

    def provider(self, *args: str) -> list[str]:
        return _cms("provider", "provider", "--endpoints", str(self.demo.endpoints_path), *args)

    def run(self, cards: int, use_pcsc: bool) -> None:
        self.issuer_key()
        self.root()
        packs = self.packs(cards, use_pcsc)
        self.trust()
        for pack in packs:
            self.import_pack(pack)
        self.show_stock()
        self.import_pack(packs[0], again=True)
        self.metrics()

    def issuer_key(self) -> None:
        """B1.1: the issuer system's issuer key pair in the issuer HSM (made once)."""
        import grpc
        from cryptography.hazmat.primitives import serialization

        from cms.v1 import provider_pb2 as ppb

        try:
            key = self.issuer_keys.GetIssuerKey(ppb.GetIssuerKeyRequest(), timeout=30)
            made = "already in"
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            key = self.issuer_keys.CreateIssuerKey(ppb.CreateIssuerKeyRequest(version=1),
                                                   timeout=60)
            made = "generated in"
        self.issuer_key_pem.write_bytes(serialization.load_der_public_key(key.public_key)
                                        .public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat
                                                      .SubjectPublicKeyInfo))
        _say("B1.1", f"issuer system: private issuer key {key.label} {made} the issuer HSM "
             f"(token {ISSUER_TOKEN!r}, P-256, never extractable); public issuer key "
             f"{key.key_id.hex()} handed to the provider in {self.issuer_key_pem.name}")

    def root(self) -> None:
        """B1.2: the provider system's root key in its HSM token and its CA certificate."""
        import grpc

        from cms.v1 import provider_pb2 as ppb
        from cms.v1 import provider_pb2_grpc

        channel = self.demo.endpoints.channel("hsm_proxy", PROVIDER)
        try:
            ca = provider_pb2_grpc.ProviderCaStub(channel)
            ca.GetRoot(ppb.GetRootRequest(provider_id=DEMO_PROVIDER_ID), timeout=30)
            action = "show"
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            action = "create"
        finally:
            channel.close()
        self.provider("root", action, "--provider-id", DEMO_PROVIDER_ID, "--out",
                      str(self.root_pem))
        verb = "made" if action == "create" else "already"
        _say("B1.2", f"provider system: root key {verb} in its HSM (token "
             f"{PROVIDER_TOKEN!r}), root CA certificate in {self.root_pem.name}")

    def packs(self, cards: int, use_pcsc: bool) -> list[Path]:
        """B1.3-B2.1: one user device through PC/SC (a pack of its own, since one run of
        init-pack takes its cards either from card agents or in process), the rest in
        process; the device initialization data of each pack."""
        out = self.exchange / f"packs-{self.demo.run_id}"
        packs = []
        in_process = cards
        if use_pcsc:
            state = self.demo.cards_dir / f"provider-pcsc-{self.demo.run_id}.json"
            from virtual_psd.factory import create_card

            create_card(state, transport_master=DEMO_TRANSPORT_MASTER)
            with CardReader(state, use_pcsc) as reader:
                if reader.over_pcsc:
                    _say("pc/sc", reader.description)
                    packs.append(self.pack_over_pcsc(reader, out))
                    in_process -= 1
        if not packs:
            _say("B1.3", f"PC/SC {'unavailable' if use_pcsc else 'not used (--no-pcsc)'}: "
                 f"all {cards} user devices in process")
        if in_process:
            _say("B1.3", f"provider system: {in_process} user devices made by the card "
                 f"factory, initialized in process")
            packs.append(self.init_pack(out, in_process, "--card-dir", str(
                self.demo.cards_dir / f"provider-{self.demo.run_id}"),
                "--transport-master-hex", DEMO_TRANSPORT_MASTER.hex()))
        return packs

    def pack_over_pcsc(self, reader: CardReader, out: Path) -> Path:
        _say("B1.3", "provider system: a user device in a PC/SC reader, driven by a card "
             "agent that dials the provider's card channel (mutual TLS, the agent checks "
             f"the server is {PROVIDER!r})")
        with _serving("provider", ["provider", "--endpoints", str(self.demo.endpoints_path),
                                   *self._init_args(out, 1), "--agents", "--agent-wait",
                                   "120"]) as (first, rest):
            address = first.split(" at ", 1)[1].split(" ", 1)[0] if " at " in first else ""
            if not address:
                raise RuntimeError(f"init-pack --agents did not say where: {first}")
            reader.agent(self.demo.endpoints_path, "station", server=address)
            lines = _stream("provider", rest)
        return self._report(out, lines)

    def _init_args(self, out: Path, cards: int) -> list[str]:
        return ["init-pack", "--cards", str(cards), "--out", str(out), "--issuer-key",
                str(self.issuer_key_pem), "--provider-id", DEMO_PROVIDER_ID]

    def init_pack(self, out: Path, cards: int, *extra: str) -> Path:
        return self._report(out, self.provider(*self._init_args(out, cards), *extra))

    def _report(self, out: Path, lines: list[str]) -> Path:
        """B1.4 for each card of the pack init-pack just wrote in ``out``, B2.1 for the pack;
        its path."""
        from cms.pack_format import read_pack
        from provider.pack import PACK_SUFFIX

        done = next((ln for ln in lines if ln.startswith("pack ") and " cards in " in ln), "")
        if not done:
            raise RuntimeError("init-pack wrote no pack")
        path = out / f"{done.split()[1].rstrip(':')}{PACK_SUFFIX}"
        pack = read_pack(path.read_bytes())
        for row in pack.rows:
            _say("B1.4", _row_summary(row))
        _say("B2.1", f"device initialization data of pack {pack.header.pack_serial} "
             f"({_cards(pack.header.card_count)}) in {path.name}, signed by the root key in "
             f"the provider's HSM ({path.name}.p7s, CMS)")
        return path

    def trust(self) -> None:
        from access_server.cli import certificate_der
        from cms.v1 import stock_pb2 as spb

        root = self.stock.TrustProvider(spb.TrustProviderRequest(
            root_certificate=certificate_der(self.root_pem.read_bytes())), timeout=30)
        _say("B2.2", f"issuer system: trusts the provider root of {root.provider_id} "
             f"(SHA-256 {root.fingerprint})")

    def import_pack(self, path: Path, again: bool = False) -> None:
        import grpc

        from access_server.cli import upload_chunks
        from cms.pack_format import SIGNATURE_SUFFIX

        signature = path.with_name(path.name + SIGNATURE_SUFFIX).read_bytes()
        step = "B2.5" if again else "B2.3"
        try:
            pack = self.stock.ImportPack(upload_chunks(path.read_bytes(), signature,
                                                       path.name), timeout=600)
        except grpc.RpcError as exc:
            if not again or exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            _say(step, f"the same pack again: {exc.details()}")
            return
        _say(step, f"issuer system: pack {pack.pack_serial} verified (signature, root-signed "
             f"keys, signed device keys, weak keys): {_cards(pack.card_count)} added to the "
             f"stock, import #{pack.import_order}")

    def show_stock(self) -> None:
        from access_server.cli import STOCK_COLUMNS, stock_table
        from cms.v1 import stock_pb2 as spb

        counts = self.stock.GetStock(spb.GetStockRequest(), timeout=30)
        table = stock_table([{"pack": p.pack_serial, **{c: getattr(p, c) for c in STOCK_COLUMNS}}
                             for p in counts.packs])
        _say("B2.4", "the stock (cms stock), first in, first out by import order:")
        for line in table.splitlines():
            print("    " + line, flush=True)

    def metrics(self) -> None:
        lines = [ln for ln in self.demo.metrics_text().splitlines()
                 if ln.startswith(("cms_stock_cards{", "cms_packs_imported"))
                 and (" 0.0" not in ln or ln.startswith("cms_packs_imported"))]
        _say("metrics", "the stock in the access server's metrics:")
        for ln in lines[:12]:
            print("    " + ln, flush=True)


class CardReader:
    """The demo card in a reader: a private pcscd with the vsmartcard reader and the card
    as a ``cms card virtual`` process, or, where PC/SC cannot run, the card in-process."""

    def __init__(self, state: Path, use_pcsc: bool) -> None:
        self.state = state
        self.use_pcsc = use_pcsc
        self.daemon: Any = None
        self.card: subprocess.Popen[bytes] | None = None
        self.description = ""

    def __enter__(self) -> CardReader:
        from deploy.pcscd import PcscUnavailable, PrivatePcscd, unavailable_reason

        reason = unavailable_reason() if self.use_pcsc else "--no-pcsc"
        if reason is None:
            daemon = PrivatePcscd()
            try:
                daemon.start()
            except PcscUnavailable as exc:
                daemon.close()
                reason = str(exc)
            else:
                self.daemon = daemon
                self.card = subprocess.Popen(
                    [sys.executable, "-m", "cms.cli", "card", "virtual", "--state",
                     str(self.state), "--vpcd", daemon.vpcd_endpoint(0)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self.description = (f"card inserted in reader {daemon.reader_name!r} of a "
                                    f"private pcscd (vsmartcard vpcd, port {daemon.vpcd_port})")
        if reason is not None:
            self.description = (f"PC/SC unavailable ({reason}); the card agent talks to the "
                                f"card in-process")
        return self

    @property
    def over_pcsc(self) -> bool:
        return self.daemon is not None

    def agent(self, endpoints: Path, role: str, *extra: str, server: str | None = None,
              server_identity: str = PROVIDER, env: dict[str, str] | None = None) -> None:
        """One card agent session; with ``server``, it dials the card channel there (the
        provider's, or ``server_identity``'s) instead of the access server; ``env`` adds to
        its environment (an activation code)."""
        command = [sys.executable, "-m", "cms.cli", "card-agent", "--endpoints", str(endpoints),
                   "--identity", "card-agent", "--role", role, "--label", f"demo-{role}",
                   "--once", "--give-up-after", "30", "--log-level", "warning", *extra]
        if server is not None:
            command += ["--server", server, "--server-identity", server_identity]
        env = {**os.environ, **(env or {})}
        if self.daemon is not None:
            env.update(self.daemon.env)
        else:
            command += ["--virtual", str(self.state)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"    agent({role}) {line.rstrip()}", flush=True)
        if proc.wait(timeout=120) != 0:
            raise RuntimeError(f"the {role} card agent exited with status {proc.returncode}")

    def __exit__(self, *exc: object) -> None:
        if self.card is not None:
            self.card.terminate()
            try:
                self.card.wait(20)
            except subprocess.TimeoutExpired:
                self.card.kill()
        if self.daemon is not None:
            self.daemon.close()


# -- 7. seed 004, B3-B5: users, issuance, the bureau, the mailing house, the card in use ----
DEMO_BUREAU = "demo-bureau"
DEMO_MAILER = "demo-post"
DEMO_USERS = (("Ada Lovelace", "12 Analytical Row\nLondon"),
              ("Émilie du Châtelet", "3 rue des Principes\nCirey"),
              ("Grace Hopper", "1 Compiler Lane\nArlington"))
USER_KEY = r"card (\S+) personalized batch \S+ user key ([0-9a-f]{66})"
ACTIVATION = r"activation code .*: ([A-Z2-7-]{23}), valid until"


class Signed(NamedTuple):
    """A signature made on a card behind its PIN, and what verified it."""

    serial: str
    user_key: bytes
    message: bytes
    signature: bytes


def _tolerant(label: str, *args: str) -> list[str]:
    """``_cms`` for a step done once per directory: a second run finds it done."""
    try:
        return _cms(label, *args)
    except RuntimeError as exc:
        if "exist" not in str(exc).lower():
            raise
        return [str(exc)]


def card_serial(path: Path) -> str:
    """The serial the provider stored in the card file at ``path`` ("" when none)."""
    from virtual_psd.issuance import issuance_state
    from virtual_psd.state import load_state

    return issuance_state(load_state(path)).serial or ""


def card_data(card: Any) -> Any:
    """SELECT the issuance applet and GET DATA DF00 on an open card."""
    from cardcore import gp
    from cardcore import issuance as card_ops
    from cardcore.apdu import parse_response

    parse_response(card.transmit(gp.select_command(card_ops.ISSUANCE_AID)))
    data, sw = parse_response(card.transmit(card_ops.get_data(card_ops.Tag.ALL)))
    if sw != 0x9000:
        raise RuntimeError(f"GET DATA DF00 answered {sw:04X}")
    return card_ops.decode_card_data(data)


def letter_codes(letters: Path, code: str = "pin") -> dict[str, bytes]:
    """The PINs (or PUKs) the mailing house printed, by card serial, read back from its PDF
    letters: what the user types."""
    from pypdf import PdfReader

    from mailer.letters import WORDING, Code

    title = re.escape(WORDING[Code(code)][0])
    codes = {}
    for path in sorted(letters.glob(f"*-{code}.pdf")):
        text = " ".join(page.extract_text() for page in PdfReader(path).pages)
        found = re.search(rf"{title} for card (\S+)\s+(\d+)", text)
        if found:
            codes[found.group(1)] = found.group(2).encode("ascii")
    return codes


class IssuanceDemo:
    """B3-B5: the issuer system issues the stock's cards to users, the bureau personalizes
    them, the mailing house prints the PIN letters, the results come back to the issuer;
    then a card in use (PIN, signature, the two authentications) and a card personalized on
    its user's PC with an activation code."""

    def __init__(self, demo: Demo, stock: StockDemo) -> None:
        self.demo = demo
        self.stock = stock
        self.exchange = stock.exchange
        self.out = self.exchange / f"issuance-{demo.run_id}"
        self.bureau_pem = self.exchange / "bureau.pem"
        self.mailer_pem = self.exchange / "mailer.pem"
        self.mailer_cert = self.exchange / "mailer-cert.pem"

    def cms(self, label: str, *args: str) -> list[str]:
        return _cms(label, *args[:1], "--endpoints", str(self.demo.endpoints_path), *args[1:])

    def run(self, use_pcsc: bool) -> Signed:
        self.issuer_secrets()
        self.partners()
        users = self.users()
        perso = self.issue(users[:-1])
        cards = self.to_bureau(perso)
        results = self.bureau(perso, cards, use_pcsc)
        letters = self.mailer(results.parent / (perso.name.removesuffix(".csv")
                                                + "-mailing.csv"))
        self.results(results)
        self.dispatched(letters / (perso.name.removesuffix(".csv") + "-dispatch.csv"))
        signed = self.card_in_use(cards, letters, users[0])
        self.user_pc(users[-1], use_pcsc)
        return signed

    def issuer_secrets(self) -> None:
        """B3.1: the seed in the issuer HSM, the device authentication KEK in the issuer
        system HSM (once per directory)."""
        for what in ("seed", "kek"):
            _tolerant("issuer", "issuer", what, "--endpoints", str(self.demo.endpoints_path),
                      "create")
        _say("B3.1", "issuer system: BIP32 seed in the issuer HSM (token 'issuer'), the key "
             "that wraps device authentication keys in the issuer system HSM (token "
             "'issuer-system'); neither ever leaves")

    def partners(self) -> None:
        """B3.2: the bureau's key and the mailing house's key, each in its own token; the
        issuer trusts the bureau's certificate."""
        for who, name, pem in (("bureau", DEMO_BUREAU, self.bureau_pem),
                               ("mailer", DEMO_MAILER, self.mailer_pem)):
            action = "show" if pem.exists() else "create"
            _cms(who, who, "--endpoints", str(self.demo.endpoints_path), f"--{who}", name,
                 "key", action, "--out", str(pem),
                 *(("--cert-out", str(self.mailer_cert)) if who == "mailer" else ()))
        for partners, cert in (("bureaus", self.bureau_pem), ("mailers", self.mailer_cert)):
            _tolerant("issuer", partners, "--endpoints", str(self.demo.endpoints_path),
                      "trust", "--cert", str(cert))
        _say("B3.2", f"personalization bureau {DEMO_BUREAU!r} (token 'bureau') and mailing "
             f"house {DEMO_MAILER!r} (token 'mailer') made their keys; the issuer trusts the "
             "bureau's and the mailing house's certificates")

    def users(self) -> list[int]:
        """B3.3: the users, each given a derivation element."""
        ids = []
        for name, address in (*DEMO_USERS, ("Alan Turing", "7 Bletchley Park\nMilton Keynes")):
            line = self.cms("issuer", "users", "add", "--name", name, "--address",
                            address.replace("\n", "\\n"))[-1]
            found = re.search(r"added: (\d+) .* element=(\d+)", line)
            if not found:
                raise RuntimeError(f"cms users add said: {line}")
            ids.append(int(found.group(1)))
            _say("B3.3", f"user {found.group(1)} ({name}): derivation element "
                 f"{found.group(2)}")
        return ids

    def issue(self, users: list[int]) -> Path:
        """B3.4-B3.7: device authentication key pairs in the issuer system HSM, the user
        private keys derived (BIP32) and sealed with them to each device key, signed by the
        private issuer key; the personalization device data for the bureau."""
        batch = f"B-{self.demo.run_id}"
        self.out.mkdir(parents=True, exist_ok=True)
        listing = self.out / "users.csv"
        listing.write_text("user_id\n" + "".join(f"{u}\n" for u in users))
        self.cms("issuer", "issue", "--pack", batch, "--users", str(listing), "--out",
                 str(self.out))
        _say("B3.4", f"issuer system: {len(users)} device authentication key pairs generated "
             "in the issuer system HSM, their private keys kept only wrapped")
        _say("B3.5", "issuer HSM: each user private key derived from the seed with the "
             "user's derivation element (BIP32), encrypted together with the public device "
             "authentication key to the card's public device key (RSA-OAEP)")
        _say("B3.6", "issuer HSM: the encrypted data signed with the private issuer key")
        _say("B3.7", f"personalization device data to the bureau: {batch}.csv and its CMS "
             "signature by the issuer key")
        return self.out / f"{batch}.csv"

    def to_bureau(self, perso: Path) -> Path:
        """The file's cards leave the issuer for the bureau (their state files move)."""
        from cms.perso_format import read_perso

        serials = {row.serial for row in read_perso(perso.read_bytes()).rows}
        cards = self.demo.cards_dir / f"bureau-{self.demo.run_id}"
        cards.mkdir()
        for path in self.demo.cards_dir.glob("provider-*/*.json"):
            if card_serial(path) in serials:
                path.rename(cards / path.name)
        for path in self.demo.cards_dir.glob("provider-pcsc-*.json"):
            if card_serial(path) in serials:
                path.rename(cards / path.name)
        return cards

    def bureau(self, perso: Path, cards: Path, use_pcsc: bool) -> Path:
        """B4.1-B4.4: the bureau injects the data, makes and sets PIN and PUK, checks each
        card, signs results, shipping and mailing files."""
        out = self.out / "bureau"
        command = ["bureau", "--endpoints", str(self.demo.endpoints_path), "--bureau",
                   DEMO_BUREAU, "personalize", str(perso), "--issuer-cert",
                   str(self.stock.issuer_key_pem), "--mailer-key", str(self.mailer_pem),
                   "--out", str(out)]
        from deploy.pcscd import unavailable_reason

        if use_pcsc and unavailable_reason() is None:
            self.bureau_over_agents(command, sorted(cards.glob("*.json")))
        else:
            _cms("bureau", *command, "--card-dir", str(cards))
        _say("B4.1", "personalization bureau: the file's signature by the issuer checked, "
             "each card matched by serial and given its personalization device data")
        _say("B4.2", "the user device checked the signature with the public issuer key and "
             "decrypted the user private key and the public device authentication key")
        _say("B4.3", "the bureau's HSM made PIN and PUK: set on the card sealed to its device "
             "key, and encrypted with the public mailing key for the mailing house")
        return out / (perso.name.removesuffix(".csv") + "-results.csv")

    def bureau_over_agents(self, command: list[str], cards: list[Path]) -> None:
        """The bureau's card channel for the run: the first card in a PC/SC reader, the
        others in process, each brought by a card agent that dials the bureau."""
        with _serving("bureau", [*command, "--agents", "--agent-wait", "120"]) as (first, rest):
            found = re.match(r"listening on (\S+?:\d+)", first)
            if not found:
                raise RuntimeError(f"bureau personalize --agents did not say where: {first}")
            where = found.group(1)
            _say("B4", "personalization bureau: cards in readers, each brought by a card "
                 "agent that dials the bureau's card channel (mutual TLS, the agent checks "
                 "the server is 'bureau')")
            for index, path in enumerate(cards):
                with CardReader(path, use_pcsc=index == 0) as reader:
                    if index == 0:
                        _say("pc/sc", reader.description)
                    reader.agent(self.demo.endpoints_path, "station", server=where,
                                 server_identity="bureau")
            _stream("bureau", rest)

    def mailer(self, mailing: Path) -> Path:
        """B4.5: the mailing house decrypts PIN and PUK with its private mailing key in its
        HSM and prints the letters."""
        letters = self.demo.directory / "letters" / self.demo.run_id
        _cms("mailer", "mailer", "--endpoints", str(self.demo.endpoints_path), "--mailer",
             DEMO_MAILER, "letters", str(mailing), "--signer", str(self.bureau_pem),
             "--out", str(letters))
        _say("B4.5", f"mailing house: PIN and PUK letters (PDF) in {letters}")
        return letters

    def results(self, results: Path) -> None:
        """B4.6: the result data back at the issuer."""
        self.cms("issuer", "issue", "results", str(results))
        _say("B4.6", "issuer system: the bureau's signed result data imported; the cards are "
             "personalized in its records")

    def dispatched(self, dispatch: Path) -> None:
        """B4.6: the mailing house's dispatch confirmation back at the issuer, after the
        results: the cards are shipped."""
        self.cms("issuer", "issue", "dispatched", str(dispatch))
        _say("B4.6", "issuer system: the mailing house's signed dispatch confirmation "
             "imported; the cards are shipped in its records")

    def card_in_use(self, cards: Path, letters: Path, user: int) -> Signed:
        """B5: the user types the PIN of the letter, the card signs with the user private
        key; the issuer and the card authenticate each other."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        shown = "\n".join(self.cms("issuer", "users", "show", str(user)))
        found = re.search(USER_KEY, shown)
        if not found:
            raise RuntimeError(f"cms users show {user}: no personalized card")
        serial, user_key = found.group(1), bytes.fromhex(found.group(2))
        pin = letter_codes(letters)[serial]
        path = next(p for p in cards.glob("*.json") if card_serial(p) == serial)
        message = f"demo {self.demo.run_id}: pay 10 to Bob".encode()
        signature = self.sign_behind_pin(path, pin, message)
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), user_key).verify(
            signature, message, ec.ECDSA(hashes.SHA256()))
        _say("B5.1", f"card {serial}: VERIFY PIN with the PIN from the letter (sealed to the "
             "card's device key), then SIGN: verified with the user's public key from the "
             "issuer (cms users show)")
        self.authenticate(path, serial)
        return Signed(serial, user_key, message, signature)

    def sign_behind_pin(self, path: Path, pin: bytes, message: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes

        from cardcore import issuance as card_ops
        from cardcore import pin_block
        from cardcore.apdu import parse_response
        from virtual_psd.card import VirtualCard

        card = VirtualCard.open(path)
        card.power_on()
        data = card_data(card)
        challenge, _ = parse_response(card.transmit(card_ops.get_challenge()))
        _, sw = parse_response(card.transmit(pin_block.verify_pin(data.device_public_key,
                                                                   challenge, pin)))
        if sw != 0x9000:
            raise RuntimeError(f"VERIFY PIN answered {sw:04X}")
        digest = hashes.Hash(hashes.SHA256())
        digest.update(message)
        signature, sw = parse_response(card.transmit(card_ops.sign(digest.finalize())))
        if sw != 0x9000:
            raise RuntimeError(f"SIGN answered {sw:04X}")
        return signature

    def authenticate(self, path: Path, serial: str) -> None:
        """B5.2 AUTHENTICATE (the card to the issuer, claim 13) and B5.3 VERIFY ISSUER (the
        issuer to the card with the device authentication key, claim 14), each through the
        issuer system (Issuance.BeginCardAuthentication, VerifyCardAuthentication and
        AuthenticateToCard): the demo only relays the card's answers, as a card agent
        would in an online contact."""
        from cardcore import issuance as card_ops
        from cardcore.apdu import parse_response
        from cms.v1 import issuance_pb2 as pb
        from cms.v1 import issuance_pb2_grpc
        from virtual_psd.card import VirtualCard

        card = VirtualCard.open(path)
        card.power_on()
        card_data(card)
        channel = self.demo.endpoints.channel("access_server", "admin")
        try:
            issuer = issuance_pb2_grpc.IssuanceStub(channel)
            begun = issuer.BeginCardAuthentication(
                pb.BeginCardAuthenticationRequest(serial=serial), timeout=60)
            signature, sw = parse_response(card.transmit(card_ops.authenticate(
                bytes(begun.challenge))))
            if sw != 0x9000:
                raise RuntimeError(f"AUTHENTICATE answered {sw:04X}")
            issuer.VerifyCardAuthentication(pb.VerifyCardAuthenticationRequest(
                serial=serial, challenge_id=begun.challenge_id, signature=signature),
                timeout=60)
            _say("B5.2", f"AUTHENTICATE: card {serial} signed the issuer system's challenge "
                 "with its private issuer authentication key; the issuer system verified it "
                 "with the public one of its stock record")
            card_challenge, _ = parse_response(card.transmit(card_ops.get_challenge()))
            answer = issuer.AuthenticateToCard(pb.AuthenticateToCardRequest(
                serial=serial, challenge=card_challenge), timeout=60)
        finally:
            channel.close()
        _, sw = parse_response(card.transmit(card_ops.verify_issuer(answer.signature)))
        if sw != 0x9000:
            raise RuntimeError(f"VERIFY ISSUER answered {sw:04X}")
        _say("B5.3", f"VERIFY ISSUER: the issuer system HSM signed card {serial}'s challenge "
             "with the private device authentication key (unwrapped only inside it); the "
             "card verified it with the public device authentication key it holds")

    def user_pc(self, user: int, use_pcsc: bool) -> None:
        """B3-B4 on the user's own PC: the card issued online, its activation code given to
        the user apart from it; the user's PC card agent personalizes it."""
        out = self.out / "online"
        out.mkdir()
        lines = self.cms("issuer", "issue", "user", str(user), "--online", "--hsm-pins",
                         "--mailer-key", str(self.mailer_pem), "--out", str(out))
        found = re.search(ACTIVATION, "\n".join(lines))
        serial = re.search(r"card (\S+): send it", "\n".join(lines))
        if not found or not serial:
            raise RuntimeError("cms issue user --online printed no activation code")
        path = next(p for p in self.demo.cards_dir.glob("provider-*/*.json")
                    if card_serial(p) == serial.group(1))
        _say("B3.8", f"issuer system: card {serial.group(1)} issued online to user {user}; "
             "the HSM made PIN and PUK for the letters")
        mailing = next(out.glob("*-mailing.csv"))
        _cms("mailer", "mailer", "--endpoints", str(self.demo.endpoints_path), "--mailer",
             DEMO_MAILER, "letters", str(mailing), "--signer", str(self.stock.issuer_key_pem),
             "--out", str(self.demo.directory / "letters" / self.demo.run_id))
        with CardReader(path, use_pcsc) as reader:
            _say("pc/sc", reader.description)
            reader.agent(self.demo.endpoints_path, "user", "--activate",
                         env={"CMS_ACTIVATION_CODE": found.group(1)})
        _say("B4.7", f"the user's PC: card {serial.group(1)} personalized through the card "
             "channel with the activation code")
