"""An issuance made through a real proxy, for the bureau and the mailing house to work on.

One proxy holds every party's keys in its tokens (the issuer's seed, KEK
and key; the bureau's keys; the mailing house's key), each made by the
identity the policy of ``cms dev up`` lets make it. Cards are virtual card
files initialized (by the software provider of the card's tests) for the
proxy's issuer key; their payloads come from IssuerHsm.IssueBatch, the
personalization file is written by ``cms.perso_format`` and signed by
IssuerHsm.SignIssuerFile, as the access server does in ``cms issue``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cardcore import issuance as I
from cardcore.issuance_keys import ec_point_from_spki, rsa_spki
from cms import perso_format as F
from cms import signed_file
from cms.v1 import issuer_pb2 as ipb
from cms.v1 import issuer_pb2_grpc, partners_pb2_grpc, provider_pb2_grpc
from cms.v1 import partners_pb2 as ppb
from cms.v1 import provider_pb2 as prpb
from tests.support.hsm_proxy import REPO, ProxyProcess, write_endpoints
from tests.virtual_psd.issuance_host import SoftwareProvider, open_card, select_applet
from virtual_psd.factory import create_card
from virtual_psd.issuance import IssuanceState, issuance_state
from virtual_psd.state import load_state

TIMEOUT = 60
BUREAU, MAILER = "bureau-1", "post-1"
PEM = serialization.Encoding.PEM
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


def users(count: int) -> list[tuple[str, str]]:
    """(name, postal address) of ``count`` users; the first with letters beyond ASCII."""
    people = [("Zoë Çelik-Ørsted", "Rue des Écoles 12\n75005 Paris")]
    people += [(f"User {i:03d}", f"{i} Example Street\n1000 Town") for i in range(1, count)]
    return people[:count]


def make_cards(directory: Path, issuer_point: bytes, count: int, prefix: str = "BUR"
               ) -> dict[str, Path]:
    """``count`` initialized virtual cards in ``directory``, by serial."""
    directory.mkdir(parents=True, exist_ok=True)
    cards = {}
    for i in range(count):
        serial = f"{prefix}-{i + 1:04d}"
        path = directory / f"{serial}.json"
        create_card(path, psd_id=f"4790504012340000{i + 1:04X}")
        SoftwareProvider(open_card(path).transmit).initialize(serial, issuer_point)
        cards[serial] = path
    return cards


@dataclass
class World:
    proxy: ProxyProcess
    directory: Path
    endpoints: Path = field(init=False)
    issuer_point: bytes = b""
    mailer_pem: Path = field(init=False)
    mailer_cert: Path = field(init=False)
    issuer_cert: Path = field(init=False)

    def __post_init__(self) -> None:
        self.endpoints = write_endpoints(self.directory / "endpoints.json", self.proxy)
        self.mailer_pem = self.directory / "mailer.pem"
        self.mailer_cert = self.directory / "mailer-cert.pem"
        self.issuer_cert = self.directory / "issuer.pem"

    def setup(self) -> None:
        """The bureau's and the mailing house's keys, made by each."""
        public = provider_pb2_grpc.IssuerKeysStub(self.proxy.channel("access-server")) \
            .GetIssuerKey(prpb.GetIssuerKeyRequest(version=1), timeout=TIMEOUT).public_key
        self.issuer_point = ec_point_from_spki(public)
        partners_pb2_grpc.BureauHsmStub(self.proxy.channel("bureau")).CreateBureauKey(
            ppb.BureauKeyRequest(bureau=BUREAU), timeout=TIMEOUT)
        mailer = partners_pb2_grpc.MailerHsmStub(self.proxy.channel("mailer")).CreateMailerKey(
            ppb.MailerKeyRequest(mailer=MAILER), timeout=TIMEOUT)
        key = serialization.load_der_public_key(mailer.public_key)
        self.mailer_pem.write_bytes(key.public_bytes(PEM, SPKI))
        self.mailer_cert.write_bytes(x509.load_der_x509_certificate(
            mailer.certificate).public_bytes(PEM))

    def issue(self, out: Path, cards: dict[str, Path], pack: str, *,
              pin_puk_by: F.PinMaker = F.PinMaker.BUREAU) -> Path:
        """The signed personalization file of ``cards`` (and, with ``hsm``, the signed
        mailing file), as ``cms issue`` writes them; the issuer's certificate too."""
        hsm = issuer_pb2_grpc.IssuerHsmStub(self.proxy.channel("access-server"))
        keys = hsm.GenerateDeviceAuthKeys(ipb.GenerateDeviceAuthKeysRequest(
            kek_version=1, count=len(cards)), timeout=TIMEOUT).keys
        issuance_id = os.urandom(16)
        items = []
        for index, (serial, path) in enumerate(sorted(cards.items())):
            data = select_applet(open_card(path))
            assert data.device_public_key is not None
            items.append(ipb.IssueItem(serial=serial,
                                       device_public_key=rsa_spki(data.device_public_key),
                                       derivation_element=100 + index,
                                       device_auth_public_key=keys[index].public_key,
                                       issuance_id=issuance_id, sequence=1))
        request = ipb.IssueBatchRequest(seed_version=1, issuer_key_version=1, items=items)
        if pin_puk_by is F.PinMaker.HSM:
            request.mailer_public_key = serialization.load_pem_public_key(
                self.mailer_pem.read_bytes()).public_bytes(serialization.Encoding.DER, SPKI)
        issued = hsm.IssueBatch(request, timeout=TIMEOUT).items
        people = users(len(items))
        now = datetime.now(UTC)
        key_id = I.issuer_key_id(self.issuer_point)
        header = F.FileHeader(issuance_id, len(items), now, issuer_key_id=key_id, pack=pack,
                              pin_puk_by=pin_puk_by)
        data = F.write_perso(header, [
            F.PersoRow(i.serial, i.payload, name, address, i.user_public_key)
            for i, (name, address) in zip(issued, people, strict=True)])
        out.mkdir(parents=True, exist_ok=True)
        path = out / (pack + F.PERSO_SUFFIX)
        self.sign_into(path, data, hsm)
        if pin_puk_by is F.PinMaker.HSM:
            mailing = F.write_mailing(header._replace(pin_puk_by=F.PinMaker.BUREAU), [
                F.MailingRow(i.serial, name, address, i.mailer_data)
                for i, (name, address) in zip(issued, people, strict=True)])
            self.sign_into(out / (pack + F.MAILING_SUFFIX), mailing, hsm)
        return path

    def sign_into(self, path: Path, data: bytes, hsm: issuer_pb2_grpc.IssuerHsmStub) -> None:
        import hashlib

        signature = hsm.SignIssuerFile(ipb.SignIssuerFileRequest(
            issuer_key_version=1, purpose=f"perso {path.stem}",
            sha256=hashlib.sha256(data).digest()), timeout=TIMEOUT).signature
        path.write_bytes(data)
        path.with_name(path.name + ".p7s").write_bytes(signature)
        signer = signed_file.read_detached(data, signature).signer
        self.issuer_cert.write_bytes(x509.load_der_x509_certificate(signer).public_bytes(PEM))


def cms(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "cms.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if check and done.returncode != 0:
        raise AssertionError(f"cms {' '.join(map(str, args))} exited {done.returncode}:\n"
                             f"{done.stdout}\n{done.stderr}")
    return done


def card_state(path: Path) -> IssuanceState:
    return issuance_state(load_state(path))


def copy_cards(cards: dict[str, Path], directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return {serial: Path(shutil.copy(path, directory)) for serial, path in cards.items()}
