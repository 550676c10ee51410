"""Bad input to ``cms provider init-pack`` ends with one clear line and a non-zero exit,
before any card or service is touched (no stack runs here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.provider.keys import PEM, issuer_files
from tests.support.launcher import cms


def _one_line(done, *words: str) -> None:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def _init(tmp_path: Path, *args: str):
    return cms("provider", "--endpoints", str(tmp_path / "none.json"), "--state",
               str(tmp_path / "state"), "init-pack", *args, check=False)


@pytest.fixture()
def issuer(tmp_path: Path):
    return issuer_files(tmp_path)


def test_zero_cards(tmp_path: Path, issuer) -> None:
    _one_line(_init(tmp_path, "--cards", "0", "--out", str(tmp_path / "out"),
                    "--issuer-key", str(issuer.public_key)), "--cards 0", "at least one")


def test_missing_issuer_key_file(tmp_path: Path) -> None:
    _one_line(_init(tmp_path, "--cards", "1", "--out", str(tmp_path / "out"),
                    "--issuer-key", str(tmp_path / "absent.pem")), "--issuer-key",
              "No such file")


@pytest.mark.parametrize("curve", [ec.SECP384R1(), ec.SECP256K1()])
def test_an_issuer_key_that_is_not_p256(tmp_path: Path, curve: ec.EllipticCurve) -> None:
    key = tmp_path / "other.pem"
    key.write_bytes(ec.generate_private_key(curve).public_key().public_bytes(
        PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    _one_line(_init(tmp_path, "--cards", "1", "--out", str(tmp_path / "out"),
                    "--issuer-key", str(key)), "not a P-256 public key")


def test_an_rsa_certificate_is_not_an_issuer_key(tmp_path: Path, issuer) -> None:
    _one_line(_init(tmp_path, "--cards", "1", "--out", str(tmp_path / "out"),
                    "--issuer-key", str(issuer.certificate)), "not a P-256 public key")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_out_dir(tmp_path: Path, issuer) -> None:
    out = tmp_path / "ro"
    out.mkdir(mode=0o500)
    _one_line(_init(tmp_path, "--cards", "1", "--out", str(out), "--issuer-key",
                    str(issuer.public_key)), "--out", "cannot write there")


def test_out_is_a_file(tmp_path: Path, issuer) -> None:
    out = tmp_path / "file"
    out.write_text("")
    _one_line(_init(tmp_path, "--cards", "1", "--out", str(out / "sub"), "--issuer-key",
                    str(issuer.public_key)), "--out", "cannot write there")


def test_an_encrypt_to_that_is_not_an_rsa_certificate(tmp_path: Path, issuer) -> None:
    _one_line(_init(tmp_path, "--cards", "1", "--out", str(tmp_path / "out"),
                    "--issuer-key", str(issuer.public_key), "--encrypt-to",
                    str(issuer.public_key)), "--encrypt-to", "not an X.509")
