"""A dev stack for the provider's tests: the factory transport master from its ceremony,
an issuer key made by the admin, the provider root made by ``cms provider root create``."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cms import keynames
from cms.runtime.client import load_endpoints
from cms.v1 import key_mgmt_pb2_grpc
from tests.provider.keys import issuer_files
from tests.support.card_keys import ceremony
from tests.support.launcher import cms, dev_stack

TRANSPORT_MASTER = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
PROVIDER_ID = "acme-cards"


class Provider:
    def __init__(self, endpoints: Path, directory: Path) -> None:
        self.endpoints = endpoints
        self.directory = directory
        self.root = directory / "root.pem"
        self.issuer = issuer_files(directory)
        self.issuer_key = directory / "issuer-key.pem"

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return cms("provider", "--endpoints", str(self.endpoints), *args, check=check)

    def init_pack(self, out: Path, *args: str, cards: int = 3, check: bool = True,
                  master: bool = True) -> subprocess.CompletedProcess[str]:
        extra = ("--transport-master-hex", TRANSPORT_MASTER.hex()) if master else ()
        return self.run("init-pack", "--cards", str(cards), "--out", str(out),
                        "--issuer-key", str(self.issuer_key), *extra, *args, check=check)


@contextmanager
def provider_stack(directory: Path) -> Iterator[Provider]:
    with dev_stack(directory / "stack") as endpoints_path:
        channel = load_endpoints(endpoints_path).channel("key_mgmt", "admin")
        try:
            ceremony(load_endpoints(endpoints_path), key_mgmt_pb2_grpc.KeyManagementStub(channel),
                     keynames.FACTORY_TRANSPORT_MASTER, TRANSPORT_MASTER, factory_master=True)
        finally:
            channel.close()
        p = Provider(endpoints_path, directory)
        cms("issuer", "key", "--endpoints", str(endpoints_path), "create", "--out",
            str(p.issuer_key))
        created = p.run("root", "create", "--provider-id", PROVIDER_ID, "--out", str(p.root))
        assert "SHA-256" in created.stdout
        yield p
