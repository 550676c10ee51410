"""Worker operations of the audit key: made once, then used to sign audit heads only.

The audit key (``cms.keynames.AUDIT_KEY``, class AUDIT_KEY) is an EC P-256
pair whose private half may only sign and is never extractable; the proxy
generates it in the token named by ``audit.token`` on first start, with the
class's template and origin tag (``hsm_proxy.key_classes.AUDIT_TEMPLATE``).

Both operations run in a general worker, sent by the frontend's
``hsm_proxy.audit.HsmHeadSigner`` and by nothing else: no servicer reaches
them, and the Hsm service refuses every key that is not an operator key, so
no caller can have the audit key sign anything. ``audit.sign`` itself takes a
head statement, not bytes: it checks the statement's shape, its key name and
fingerprint, and signs the SHA-256 of its canonical form (CKM_ECDSA on the
digest: the same ECDSA-SHA256 signature on every token, whether or not it
offers CKM_ECDSA_SHA256), so the key signs audit heads and nothing else.
"""

from __future__ import annotations

import hashlib

from pkcs11 import Mechanism, ObjectClass

from cms.runtime.errors import FailedPrecondition, InvalidArgument
from cms.v1 import hsm_pb2 as pb
from hsm_proxy import key_classes as kc
from hsm_proxy.audit import (
    AuditKeyRequest,
    SignHeadRequest,
    head_problem,
    key_fingerprint,
    signed_bytes,
)
from hsm_proxy.backend import ResolvedKey
from hsm_proxy.keyspec import generate_signing_pair, spki_der
from hsm_proxy.registry import WorkerContext, operation


def _generate(ctx: WorkerContext, token: str, label: str) -> None:
    generate_signing_pair(ctx.backend.session(token), label, pb.AUDIT_KEY)
    ctx.backend.forget(token, label)


def _audit_key(ctx: WorkerContext, token: str, label: str) -> tuple[ResolvedKey, bytes]:
    """The audit key and its public key (DER SPKI), when it matches its class."""
    key = ctx.backend.key(token, label)
    if key.conformance:
        raise kc.KeyClassError(f"audit key {label!r} on token {token!r} does not match its "
                               f"class: {key.conformance}; the proxy signs no audit head "
                               f"with it")
    der = spki_der(key.attrs)
    if der is None:
        raise FailedPrecondition(f"audit key {label!r} on token {token!r} has no readable "
                                 f"public key")
    return key, der


@operation("audit.ensure_key", idempotent=False)
def ensure_key(ctx: WorkerContext, req: AuditKeyRequest) -> bytes:
    """The audit key's public key (DER SPKI), generating the key when the token has none."""
    kc.require_role(req.label, {pb.AUDIT_KEY}, "audit key")
    if not ctx.backend.label_exists(req.token, req.label):
        _generate(ctx, req.token, req.label)
    return _audit_key(ctx, req.token, req.label)[1]


@operation("audit.sign", idempotent=True)
def sign_head(ctx: WorkerContext, req: SignHeadRequest) -> bytes:
    """ECDSA-SHA256 signature (r||s) of an audit head statement."""
    kc.require_role(req.label, {pb.AUDIT_KEY}, "audit key")
    problem = head_problem(req.head, signed=False)
    if problem:
        raise InvalidArgument(f"the audit key signs audit heads only: {problem}")
    if (req.head["token"], req.head["key"]) != (req.token, req.label):
        raise InvalidArgument("the head names another key than the one asked to sign it")
    key, der = _audit_key(ctx, req.token, req.label)
    if req.head["key_fingerprint"] != key_fingerprint(der):
        raise InvalidArgument("the head's key fingerprint is not the audit key's")
    found = key.get(ObjectClass.PRIVATE_KEY)
    if found is None:
        raise FailedPrecondition(f"audit key {req.label!r} has no private key object")
    digest = hashlib.sha256(signed_bytes(req.head)).digest()
    return bytes(found[0].sign(digest, mechanism=Mechanism.ECDSA))
