"""A gRPC client in another language, given only protos/ and endpoints.json.

tests/interop/node/client.js (@grpc/grpc-js + @grpc/proto-loader, installed by
scripts/bootstrap) checks the proxy's health and signs over mutual TLS; the
signature is verified here with the public key exported through the proxy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tests.support.launcher import cms, dev_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

NODE_DIR = Path(__file__).parent / "node"
LABEL = "demo/node-interop"


def _node() -> str:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip("node or tests/interop/node/node_modules missing "
                    "(scripts/bootstrap test installs them)")
    return node


def _run_client(node: str, endpoints_path: Path, identity: str, data: bytes
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, str(NODE_DIR / "client.js"), str(endpoints_path), identity, "access", LABEL,
         data.hex()], capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("stack")
    with dev_stack(directory) as endpoints_path:
        ep = str(endpoints_path)
        cms("hsm", "--endpoints", ep, "generate", "--token", "access", "--label", LABEL,
            "--algorithm", "ec-p256")
        yield endpoints_path


def test_node_client_checks_health_and_signs_over_mutual_tls(stack: Path) -> None:
    node = _node()
    data = b"signed by a client written from the contracts alone"
    done = _run_client(node, stack, "admin", data)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["health"] == "SERVING"

    pem = cms("hsm", "--endpoints", str(stack), "public-key", "--token", "access",
              "--label", LABEL).stdout
    public_key = serialization.load_pem_public_key(pem.encode())
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    raw = bytes.fromhex(result["signature"])         # r || s, as the contract says
    assert len(raw) == 64
    signature = encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                     int.from_bytes(raw[32:], "big"))
    public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public_key.verify(signature, data + b"!", ec.ECDSA(hashes.SHA256()))


def test_node_client_is_held_to_the_policy_of_its_identity(stack: Path) -> None:
    node = _node()
    done = _run_client(node, stack, "card-agent", b"not allowed")
    assert done.returncode != 0
    assert "sign failed: 7" in done.stderr          # PERMISSION_DENIED
