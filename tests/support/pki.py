"""Certificates for tests: the development PKI plus the ones mTLS must refuse."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from pathlib import Path

from deploy.pki import (
    DEFAULT_IDENTITIES,
    IdentityFiles,
    Pki,
    init_pki,
    issue_identity,
    load_ca,
    make_ca,
    write_identity,
)


def make_pki(directory: Path, identities: Iterable[str] = DEFAULT_IDENTITIES) -> Pki:
    """A development CA in ``directory`` with one certificate per identity."""
    return init_pki(directory, identities)


def foreign_identity(directory: Path, identity: str) -> IdentityFiles:
    """A well-formed certificate for ``identity`` issued by a CA nobody trusts."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca("a foreign CA")
    key, cert = issue_identity(ca_key, ca_cert, identity, server=False)
    return write_identity(directory, identity, key, cert)


def expired_identity(pki: Pki, directory: Path, identity: str) -> IdentityFiles:
    """A certificate of our own CA for ``identity`` whose validity ended yesterday."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = load_ca(pki.directory)
    now = dt.datetime.now(dt.UTC)
    key, cert = issue_identity(ca_key, ca_cert, identity, server=False,
                               not_before=now - dt.timedelta(days=30),
                               not_after=now - dt.timedelta(days=1))
    return write_identity(directory, identity, key, cert)
