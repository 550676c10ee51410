"""Seed 004's B1-B2 end to end, as the provider and the issuer would run it on a stack of
``cms dev up``: the issuer key and the provider root made in their HSM tokens, one user
device initialized through real PC/SC (a private pcscd, the vsmartcard reader, ``cms card
virtual`` and a card agent dialing the provider's ``init-pack --agents``) and two in
process, each in a pack of its own (one run of init-pack takes its cards from agents or
from a card directory, not both); the certificates and the pack signatures checked by
openssl; the root trusted, both packs imported, the stock counted, the import repeated.

Then nothing of what must stay secret is anywhere the run wrote: the cards' private keys
(read from the virtual cards' state files, which are their EEPROM and the one place allowed
to hold them) and the tokens' PINs are in no other file, no database row and no command's
output; the root and issuer private keys cannot be read at all, as their token says.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cms import keynames
from cms.pack_format import SIGNATURE_SUFFIX, PackRow, read_pack
from deploy.softhsm import SoftHsm
from provider.cards import existing_cards, new_card
from tests.provider.stack import PROVIDER_ID, TRANSPORT_MASTER, Provider, provider_stack
from tests.support.launcher import CMS, cms
from tests.support.scan import assert_absent, card_private_values
from tests.support.token import RawToken
from virtual_psd.issuance import issuance_state
from virtual_psd.state import load_state

pcsc = pytest.importorskip("tests.support.pcsc")

pytestmark = [pytest.mark.pcsc, pytest.mark.integration, pytest.mark.timeout(600)]
PRIVATE_KEY_CLASS = 3          # CKO_PRIVATE_KEY
UNREADABLE = ("SENSITIVE", "EXTRACTABLE", "NEVER_EXTRACTABLE", "ALWAYS_SENSITIVE", "VALUE")


class Outputs:
    """Every command of the run, its output kept for the scan."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def keep(self, done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
        self.texts += [done.stdout, done.stderr]
        return done

    def cms(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.keep(cms(*args, check=check))


@pytest.fixture
def pcscd() -> Iterator[pcsc.PrivatePcscd]:
    with pcsc.started_or_skip() as daemon:
        yield daemon


def _listening_address(line: str) -> str:
    """HOST:PORT from init-pack's "waiting for N cards from card agents at HOST:PORT (...)"."""
    assert "from card agents at " in line, line
    return line.split(" at ", 1)[1].split(" ", 1)[0]


def _pack_over_pcsc(pcscd: pcsc.PrivatePcscd, provider: Provider, cards: Path, out: Path,
                    outputs: Outputs) -> None:
    """One card in the private reader, initialized by init-pack --agents through an agent."""
    state = new_card(cards, TRANSPORT_MASTER)
    card = subprocess.Popen([*CMS, "card", "virtual", "--state", str(state), "--vpcd",
                             pcscd.vpcd_endpoint(0)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    init = subprocess.Popen(
        [*CMS, "provider", "--endpoints", str(provider.endpoints), "init-pack", "--agents",
         "--cards", "1", "--out", str(out), "--issuer-key", str(provider.issuer_key),
         "--agent-wait", "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert init.stdout is not None
        first = init.stdout.readline()
        outputs.texts.append(first)
        agent = outputs.keep(subprocess.run(
            [*CMS, "card-agent", "--endpoints", str(provider.endpoints), "--server",
             _listening_address(first), "--server-identity", "provider", "--role", "station",
             "--once", "--give-up-after", "30"],
            capture_output=True, text=True, timeout=120, env=pcscd.client_env(), check=False))
        assert agent.returncode == 0, agent.stdout + agent.stderr
        assert "B1 card initialized by the provider" in agent.stdout + agent.stderr
        rest, errors = init.communicate(timeout=120)
        outputs.texts += [rest, errors]
        assert init.returncode == 0, rest + errors
    finally:
        if init.poll() is None:
            init.kill()
            init.wait()
        card.terminate()
        card.wait(timeout=20)


def _pem(der: bytes, path: Path) -> Path:
    path.write_bytes(x509.load_der_x509_certificate(der).public_bytes(
        serialization.Encoding.PEM))
    return path


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"openssl {args[0]}: {done.stdout}{done.stderr}"


def _check_with_openssl(packs: list[Path], rows: list[PackRow], root: Path,
                        scratch: Path) -> None:
    for pack in packs:
        _openssl("cms", "-verify", "-binary", "-inform", "DER", "-in",
                 str(pack.with_name(pack.name + SIGNATURE_SUFFIX)), "-content", str(pack),
                 "-CAfile", str(root), "-out", "/dev/null")
    for row in rows:
        for name, der in (("device", row.device_certificate),
                          ("issuer-auth", row.issuer_auth_certificate)):
            _openssl("verify", "-CAfile", str(root),
                     str(_pem(der, scratch / f"{row.serial}-{name}.pem")))


def _never_readable(hsm: SoftHsm, token: str, label: str) -> None:
    """The token's own word: the private key is sensitive and never was extractable, and
    its value cannot be read even with the PIN."""
    objects = RawToken(hsm, token).read(label, ["CLASS", *UNREADABLE])
    (private,) = [o for o in objects if o["CLASS"] == PRIVATE_KEY_CLASS]
    assert private["SENSITIVE"] is True and private["ALWAYS_SENSITIVE"] is True
    assert private["EXTRACTABLE"] is False and private["NEVER_EXTRACTABLE"] is True
    assert str(private["VALUE"]).startswith("error:"), private


def _card_secrets(card_dirs: list[Path]) -> tuple[list[Path], dict[str, bytes]]:
    states = [p for d in card_dirs for p in existing_cards(d)]
    known: dict[str, bytes] = {}
    for path in states:
        values = card_private_values(issuance_state(load_state(path)))
        # The card's EEPROM does hold them (so the scan looks for the right bytes).
        assert values[1].hex().encode() in path.read_bytes().lower()
        known.update({f"{path.name} private value {i}": v for i, v in enumerate(values)})
    return states, known


def _written_files(top: Path, skip: set[Path], softhsm: Path) -> list[Path]:
    return [p for p in top.rglob("*") if p.is_file() and p not in skip
            and softhsm not in p.parents]


def test_flow_b1_provider_initialization_to_the_issuers_stock(pcscd, tmp_path: Path) -> None:
    outputs = Outputs()
    packs_dir, pcsc_cards, local_cards = (tmp_path / "packs", tmp_path / "reader-cards",
                                          tmp_path / "local-cards")
    pcsc_cards.mkdir()
    with provider_stack(tmp_path) as provider:
        stack = provider.endpoints.parent
        ep = ("--endpoints", str(provider.endpoints))
        outputs.cms("issuer", "key", *ep, "show")
        outputs.cms("provider", *ep, "root", "show", "--provider-id", PROVIDER_ID)
        _pack_over_pcsc(pcscd, provider, pcsc_cards, packs_dir, outputs)
        outputs.keep(provider.init_pack(packs_dir, "--card-dir", str(local_cards), cards=2))
        packs = sorted(packs_dir.glob("*.csv"))
        rows = [row for pack in packs for row in read_pack(pack.read_bytes()).rows]
        assert [len(read_pack(p.read_bytes()).rows) for p in packs] == [1, 2]
        assert len({row.serial for row in rows}) == 3
        _check_with_openssl(packs, rows, provider.root, tmp_path)

        trusted = outputs.cms("providers", *ep, "trust", "--root-cert", str(provider.root))
        assert trusted.stdout.startswith(f"trusted: {PROVIDER_ID} ")
        for pack in packs:
            done = outputs.cms("packs", *ep, "import", str(pack))
            assert done.stdout.startswith(f"imported: {pack.stem} "), done.stdout
        counts = outputs.cms("stock", *ep, "--json")
        in_stock = {p["pack"]: p["in_stock"] for p in json.loads(counts.stdout)["packs"]}
        assert in_stock == {packs[0].stem: 1, packs[1].stem: 2}
        table = outputs.cms("stock", *ep).stdout.splitlines()
        assert table[-1].split() == ["total", "3", "0", "0", "0", "0", "0"]
        again = outputs.cms("packs", *ep, "import", str(packs[0]), check=False)
        assert again.returncode == 1 and again.stdout == ""
        assert again.stderr.startswith(f"cms: ALREADY_EXISTS: pack {packs[0].stem} already "
                                       "imported") and again.stderr.count("\n") == 1
        assert outputs.cms("stock", *ep).stdout.splitlines()[-1].split()[1] == "3"
        outputs.cms("packs", *ep, "list")
        dumps = [subprocess.run(["sqlite3", str(db), ".dump"], capture_output=True, check=True,
                                timeout=60).stdout for db in sorted((stack / "data").glob("*.db"))]
    # The dumps hold the stock (so scanning them means something).
    assert all(any(row.serial.encode() in d for d in dumps) for row in rows)

    hsm = SoftHsm(stack / "softhsm")
    _never_readable(hsm, keynames.PROVIDER_TOKEN, keynames.provider_root_label(PROVIDER_ID))
    _never_readable(hsm, keynames.ISSUER_TOKEN, keynames.issuer_key_label(1))
    pins = {p.name: p.read_bytes().strip() for p in hsm.secrets_dir.glob("*pin")}
    assert len(pins) == 2 * len(keynames.TOKENS) and all(pins.values())
    states, known = _card_secrets([pcsc_cards, local_cards])
    assert len(states) == 3
    known.update({f"PIN {name}": pin for name, pin in pins.items()})
    files = _written_files(tmp_path, set(states), hsm.directory)
    assert {p.name for p in files} >= {"hsm-proxy.jsonl", "access_server.log", "access.db",
                                       f"{packs[0].name}{SIGNATURE_SUFFIX}"}
    for path in files:
        assert_absent(path.read_bytes(), known, str(path.relative_to(tmp_path)))
    for i, dump in enumerate(dumps):
        assert_absent(dump, known, f"database dump {i}")
    for i, text in enumerate(outputs.texts):
        assert "Traceback" not in text
        assert_absent(text.encode(), known, f"command output {i}")
