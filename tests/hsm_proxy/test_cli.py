"""``cms hsm ...``: the operator client against a real proxy, found through endpoints.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.hsm_proxy.helpers import unique, verify_ecdsa
from tests.support.hsm_proxy import REPO, write_endpoints

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def endpoints(proxy, tmp_path_factory) -> Path:
    return write_endpoints(tmp_path_factory.mktemp("cli") / "endpoints.json", proxy)


def cms(endpoints: Path, *args: str, identity: str = "admin") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cms.cli", "hsm", "--endpoints", str(endpoints), "--identity",
         identity, *args], capture_output=True, text=True, cwd=REPO, timeout=120, check=False)


def test_tokens_and_identity_errors(endpoints):
    result = cms(endpoints, "tokens")
    assert result.returncode == 0, result.stderr
    assert "access: SoftHSM project" in result.stdout and "kms:" in result.stdout
    denied = cms(endpoints, "tokens", identity="stranger")
    assert denied.returncode == 1
    assert "PERMISSION_DENIED" in denied.stderr and "'stranger'" in denied.stderr
    missing = subprocess.run([sys.executable, "-m", "cms.cli", "hsm", "--endpoints",
                              str(endpoints.with_name("none.json")), "tokens"],
                             capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert missing.returncode == 1 and "no endpoints file" in missing.stderr


def test_generate_sign_verify_and_inspect(endpoints):
    label = unique("demo/cli")
    made = cms(endpoints, "generate", "--token", "access", "--label", label, "--algorithm",
               "ec-p256")
    assert made.returncode == 0, made.stderr
    assert f"access/{label} key_pair EC_P256" in made.stdout and "sensitive=True" in made.stdout

    signed = cms(endpoints, "sign", "--token", "access", "--label", label, "--data", "hello")
    assert signed.returncode == 0, signed.stderr
    signature = bytes.fromhex(signed.stdout.strip())
    pem = cms(endpoints, "public-key", "--token", "access", "--label", label)
    public = serialization.load_pem_public_key(pem.stdout.encode())
    verify_ecdsa(public, signature, b"hello", prehashed=False)

    ok = cms(endpoints, "verify", "--token", "access", "--label", label, "--data", "hello",
             "--signature", signature.hex())
    assert ok.returncode == 0 and ok.stdout.strip() == "valid"
    bad = cms(endpoints, "verify", "--token", "access", "--label", label, "--data", "hullo",
              "--signature", signature.hex())
    assert bad.returncode == 1 and bad.stdout.strip() == "INVALID"

    attrs = cms(endpoints, "--json", "attributes", "--token", "access", "--label", label)
    info = json.loads(attrs.stdout)
    assert info["sensitive"] and info["neverExtractable"] and not info.get("extractable")
