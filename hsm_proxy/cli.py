"""Commands of the proxy: ``cms hsm-proxy``, ``cms audit`` and the operator clients ``cms hsm``
and ``cms issuer key|seed|kek``.

``cms hsm ...`` and ``cms issuer ...`` talk to a running proxy as one
identity (default ``admin``),
finding it through endpoints.json (``--endpoints``, $CMS_ENDPOINTS or
./var/demo/endpoints.json). Binary values are given and shown in hex.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ALGORITHMS = {
    "aes-128": "AES_128", "aes-192": "AES_192", "aes-256": "AES_256",
    "generic-secret": "GENERIC_SECRET", "ec-p256": "EC_P256", "ec-secp256k1": "EC_SECP256K1",
    "rsa-2048": "RSA_2048", "rsa-3072": "RSA_3072",
}
SIGN_MECHANISMS = {
    "ecdsa": "ECDSA", "ecdsa-sha256": "ECDSA_SHA256", "rsa-pkcs1-sha256": "RSA_PKCS1_SHA256",
    "rsa-pss-sha256": "RSA_PSS_SHA256", "aes-cmac": "AES_CMAC",
}
USAGES = ("encrypt", "decrypt", "sign", "verify", "wrap", "unwrap", "derive")
KEY_CLASSES = {"secret": "SECRET_KEY", "private": "PRIVATE_KEY", "public": "PUBLIC_KEY",
               "pair": "KEY_PAIR"}
DEFAULT_TIMEOUT_S = 30.0


def register(sub: argparse._SubParsersAction) -> None:
    proxy = sub.add_parser("hsm-proxy", help="the HSM proxy service")
    psub = proxy.add_subparsers(dest="proxy_command", metavar="ACTION", required=True)
    serve = psub.add_parser("serve", help="serve the cms.v1.Hsm contract over mutual TLS")
    serve.add_argument("--config", required=True, type=Path, help="proxy configuration (YAML)")
    serve.add_argument("--ready-file", type=Path,
                       help="write {pid, grpc, metrics} here once serving")
    serve.set_defaults(func=_serve)

    audit = sub.add_parser("audit", help="the proxy's audit log")
    asub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = asub.add_parser(
        "verify", help="check the hash chain, the signed checkpoints and the signed head of "
                       "an audit log")
    verify.add_argument("file", type=Path)
    verify.add_argument("--public-key", type=Path, metavar="PEM",
                        help="the pinned audit public key (default: FILE.pub.pem beside the "
                             "log, which proves nothing against someone who can rewrite it)")
    verify.add_argument("--anchor", type=Path, metavar="HEAD",
                        help="a copy of an earlier head kept elsewhere: fail unless the log "
                             "still reaches it")
    verify.set_defaults(func=_audit_verify)

    _register_client(sub)
    _register_issuer(sub)


# ---------------------------------------------------------------------------
# Service and audit

def _serve(args: argparse.Namespace) -> int:
    from hsm_proxy.server import serve

    return serve(args.config, args.ready_file)


def _audit_verify(args: argparse.Namespace) -> int:
    from cms.runtime.cli_error import CliError
    from hsm_proxy.audit import AuditError, verify_log

    try:
        report = verify_log(args.file, public_key=args.public_key, anchor=args.anchor)
    except AuditError as exc:
        raise CliError(str(exc), status=2) from None
    for note in report.notes:
        print(f"note: {note}")
    if report.ok:
        print(f"OK: {report.records} records, chain intact, {report.checkpoints} signed "
              f"checkpoint(s), signed head at seq {report.head_seq}")
        return 0
    where = (f"the chain of {report.records} records is intact" if report.chain_intact
             else f"{report.records} records verified before it")
    print(f"FAILED: {report.problem} ({where})")
    return 1


# ---------------------------------------------------------------------------
# Operator client

def _register_client(sub: argparse._SubParsersAction) -> None:
    hsm = sub.add_parser("hsm", help="operate on the HSM through the proxy")
    _client_args(hsm)
    hsub = hsm.add_subparsers(dest="hsm_command", metavar="ACTION", required=True)

    p = hsub.add_parser("tokens", help="list the tokens the proxy fronts")
    p.set_defaults(func=_tokens)

    p = hsub.add_parser("keys", help="list persistent keys on a token")
    p.add_argument("--token", required=True)
    p.add_argument("--pattern", default="*", help="label glob (default *)")
    p.add_argument("--class", dest="key_class", choices=sorted(KEY_CLASSES))
    p.set_defaults(func=_keys)

    p = hsub.add_parser("generate", help="generate an operator key (secret or key pair): "
                                         "never extractable; blocks come from 'cms keys'")
    p.add_argument("--token", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--algorithm", required=True, choices=sorted(ALGORITHMS))
    p.add_argument("--length", type=int, default=0, help="bytes (generic-secret only)")
    p.add_argument("--usage", action="append", choices=USAGES,
                   help="repeatable (default: sign+verify for pairs, encrypt+decrypt for AES)")
    p.add_argument("--session", action="store_true", help="session key (returns a handle)")
    p.set_defaults(func=_generate)

    p = hsub.add_parser("attributes", help="attributes and check value of a key")
    _key_args(p)
    p.add_argument("--class", dest="key_class", choices=sorted(KEY_CLASSES))
    p.set_defaults(func=_attributes)

    p = hsub.add_parser("public-key", help="export a public key (PEM)")
    _key_args(p)
    p.set_defaults(func=_public_key)

    p = hsub.add_parser("sign", help="sign data (or a digest for ecdsa) with a key")
    _key_args(p)
    p.add_argument("--mechanism", default="ecdsa-sha256", choices=sorted(SIGN_MECHANISMS))
    _data_args(p)
    p.set_defaults(func=_sign)

    p = hsub.add_parser("verify", help="verify a signature (or MAC) with a key")
    _key_args(p)
    p.add_argument("--mechanism", default="ecdsa-sha256", choices=sorted(SIGN_MECHANISMS))
    _data_args(p)
    p.add_argument("--signature", required=True, help="signature in hex")
    p.set_defaults(func=_verify)

    p = hsub.add_parser("random", help="random bytes from the HSM")
    p.add_argument("--token", required=True)
    p.add_argument("--length", type=int, default=16)
    p.set_defaults(func=_random)

    p = hsub.add_parser("destroy", help="destroy a persistent key (both halves of a pair)")
    _key_args(p)
    p.set_defaults(func=_destroy)


def _client_args(p: argparse.ArgumentParser) -> None:
    """Where the proxy is, and who to be: the options of every client command."""
    p.add_argument("--endpoints", help="endpoints.json (default: $CMS_ENDPOINTS or "
                                       "var/demo/endpoints.json)")
    p.add_argument("--identity", default="admin", help="TLS identity to act as (default admin)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", help="token of a labelled key")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--label")
    group.add_argument("--handle")


def _data_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--data", help="data as text (UTF-8)")
    group.add_argument("--data-hex", help="data in hex")
    group.add_argument("--data-file", type=Path, help="data from a file ('-' for stdin)")


def _data(args: argparse.Namespace) -> bytes:
    from cms.runtime.cli_error import CliError

    if args.data is not None:
        return args.data.encode()
    if args.data_hex is not None:
        try:
            return bytes.fromhex(args.data_hex)
        except ValueError:
            raise CliError("--data-hex: not hexadecimal") from None
    if str(args.data_file) == "-":
        return sys.stdin.buffer.read()
    try:
        return args.data_file.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {args.data_file}: {exc.strerror}") from None


def _stub(args: argparse.Namespace) -> Any:
    from cms.runtime.client import load_endpoints
    from cms.v1 import hsm_pb2_grpc

    channel = load_endpoints(args.endpoints).channel("hsm_proxy", args.identity)
    return hsm_pb2_grpc.HsmStub(channel)


def _ref(args: argparse.Namespace) -> Any:
    from cms.runtime.cli_error import CliError
    from cms.v1 import hsm_pb2 as pb

    if args.handle:
        return pb.KeyRef(handle=args.handle)
    if not args.token:
        raise CliError("--token is required with --label")
    return pb.KeyRef(token=args.token, label=args.label)


def _print(args: argparse.Namespace, message: Any, text: str) -> None:
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(message), indent=2))
    else:
        print(text)


def _describe(info: Any) -> str:
    from cms.v1 import hsm_pb2 as pb

    ref = info.ref.handle or f"{info.ref.token}/{info.ref.label}"
    usages = ",".join(pb.KeyUsage.Name(u).lower() for u in info.usages) or "-"
    parts = [
        ref, pb.KeyClass.Name(info.key_class).lower(), pb.KeyAlgorithm.Name(info.algorithm),
        f"class={pb.KeyRole.Name(info.role).lower()}",
        f"origin={pb.KeyOrigin.Name(info.origin).lower()}",
        f"usages={usages}", f"sensitive={info.sensitive}", f"extractable={info.extractable}",
        f"always_sensitive={info.always_sensitive}",
        f"never_extractable={info.never_extractable}", f"local={info.local}",
        f"trusted={info.trusted}", f"wrap_with_trusted={info.wrap_with_trusted}",
        f"modifiable={info.modifiable}",
    ]
    if info.kcv:
        parts.append(f"kcv={info.kcv.hex()}")
    if info.HasField("expires"):
        parts.append(f"expires={info.expires.ToJsonString()}")
    if info.conformance:
        parts.append(f"NOT-CONFORMING({info.conformance})")
    return " ".join(parts)


def _tokens(args: argparse.Namespace) -> int:
    from cms.v1 import hsm_pb2 as pb

    reply = _stub(args).ListTokens(pb.ListTokensRequest(), timeout=DEFAULT_TIMEOUT_S)
    lines = [f"{t.label}: {t.manufacturer} {t.model} serial={t.serial} "
             f"available={t.available}" for t in reply.tokens]
    _print(args, reply, "\n".join(lines) or "(no tokens visible to this identity)")
    return 0


def _keys(args: argparse.Namespace) -> int:
    from cms.v1 import hsm_pb2 as pb

    reply = _stub(args).ListKeys(pb.ListKeysRequest(
        token=args.token, label_pattern=args.pattern,
        key_class=pb.KeyClass.Value(KEY_CLASSES[args.key_class]) if args.key_class else 0),
        timeout=DEFAULT_TIMEOUT_S)
    _print(args, reply, "\n".join(_describe(k) for k in reply.keys) or "(no keys)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from cms.v1 import hsm_pb2 as pb

    algorithm = pb.KeyAlgorithm.Value(ALGORITHMS[args.algorithm])
    pair = args.algorithm.startswith(("ec-", "rsa-"))
    usages = args.usage or (["sign"] if pair else ["encrypt", "decrypt"])
    template = pb.KeyTemplate(label=args.label, usages=[pb.KeyUsage.Value(u.upper())
                                                        for u in usages],
                              session=args.session)
    stub = _stub(args)
    if pair:
        info = stub.GenerateKeyPair(pb.GenerateKeyPairRequest(
            token=args.token, algorithm=algorithm, template=template), timeout=120)
    else:
        info = stub.GenerateSecretKey(pb.GenerateSecretKeyRequest(
            token=args.token, algorithm=algorithm, length_bytes=args.length, template=template),
            timeout=DEFAULT_TIMEOUT_S)
    _print(args, info, _describe(info))
    return 0


def _attributes(args: argparse.Namespace) -> int:
    from cms.v1 import hsm_pb2 as pb

    info = _stub(args).GetKeyAttributes(pb.GetKeyAttributesRequest(
        key=_ref(args),
        key_class=pb.KeyClass.Value(KEY_CLASSES[args.key_class]) if args.key_class else 0),
        timeout=DEFAULT_TIMEOUT_S)
    _print(args, info, _describe(info))
    return 0


def _public_key(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    from cms.v1 import hsm_pb2 as pb

    reply = _stub(args).GetPublicKey(pb.GetPublicKeyRequest(key=_ref(args)),
                                     timeout=DEFAULT_TIMEOUT_S)
    pem = serialization.load_der_public_key(reply.public_key_der).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _print(args, reply, pem.decode().rstrip())
    return 0


def _sign(args: argparse.Namespace) -> int:
    from cms.v1 import hsm_pb2 as pb

    reply = _stub(args).Sign(pb.SignRequest(
        key=_ref(args), mechanism=pb.SignMechanism.Value(SIGN_MECHANISMS[args.mechanism]),
        data=_data(args)), timeout=DEFAULT_TIMEOUT_S)
    _print(args, reply, reply.signature.hex())
    return 0


def _verify(args: argparse.Namespace) -> int:
    from cms.runtime.cli_error import CliError
    from cms.v1 import hsm_pb2 as pb

    try:
        signature = bytes.fromhex(args.signature)
    except ValueError:
        raise CliError("--signature: not hexadecimal") from None
    reply = _stub(args).Verify(pb.VerifyRequest(
        key=_ref(args), mechanism=pb.SignMechanism.Value(SIGN_MECHANISMS[args.mechanism]),
        data=_data(args), signature=signature), timeout=DEFAULT_TIMEOUT_S)
    _print(args, reply, "valid" if reply.valid else "INVALID")
    return 0 if reply.valid else 1


def _random(args: argparse.Namespace) -> int:
    from cms.v1 import hsm_pb2 as pb

    reply = _stub(args).GenerateRandom(pb.GenerateRandomRequest(
        token=args.token, length=args.length), timeout=DEFAULT_TIMEOUT_S)
    _print(args, reply, reply.data.hex())
    return 0


def _destroy(args: argparse.Namespace) -> int:
    from cms.v1 import hsm_pb2 as pb

    reply = _stub(args).DestroyKey(pb.DestroyKeyRequest(key=_ref(args)),
                                   timeout=DEFAULT_TIMEOUT_S)
    _print(args, reply, f"destroyed {reply.destroyed} object(s)")
    return 0


# ---------------------------------------------------------------------------
# Issuer keys (seed 004): made in the issuer's token, only their public halves leave;
# the seed and the device authentication KEK, which never leave

def _register_issuer(sub: argparse._SubParsersAction) -> None:
    issuer = sub.add_parser("issuer", help="the issuer's keys and seed in the HSM (through the "
                                           "proxy)")
    isub = issuer.add_subparsers(dest="issuer_command", metavar="WHAT", required=True)
    key = isub.add_parser("key", help="the issuer key whose public half goes into every card")
    _client_args(key)
    ksub = key.add_subparsers(dest="issuer_key_command", metavar="ACTION", required=True)
    p = ksub.add_parser("create", help="generate an issuer key in the issuer's token "
                                       "(P-256, never extractable)")
    p.add_argument("--version", type=int, default=1, help="key version, 1 to 255 (default 1)")
    p.add_argument("--out", type=Path, metavar="PEM", help="also write the public key here")
    p.set_defaults(func=_issuer_key_create)
    p = ksub.add_parser("show", help="the public issuer key of a version (default the newest)")
    p.add_argument("--version", type=int, default=0, help="key version (default: the newest)")
    p.add_argument("--out", type=Path, metavar="PEM", help="also write the public key here")
    p.set_defaults(func=_issuer_key_show)
    for what, helptext, func in (
            ("seed", "the issuer's BIP32 seed, from which every user key is derived "
                     "(token issuer)", _issuer_seed_create),
            ("kek", "the key-encryption key of the device authentication keys "
                    "(token issuer-system)", _issuer_kek_create)):
        p = isub.add_parser(what, help=helptext)
        _client_args(p)
        made = p.add_subparsers(dest=f"issuer_{what}_command", metavar="ACTION", required=True)
        p = made.add_parser("create", help="generate it in the HSM, once per version "
                                           "(never extractable in clear)")
        p.add_argument("--version", type=int, default=1, help="version, 1 to 255 (default 1)")
        p.set_defaults(func=func)


def _issuer_hsm_stub(args: argparse.Namespace) -> Any:
    from cms.runtime.client import load_endpoints
    from cms.v1 import issuer_pb2_grpc

    channel = load_endpoints(args.endpoints).channel("hsm_proxy", args.identity)
    return issuer_pb2_grpc.IssuerHsmStub(channel)


def _issuer_seed_create(args: argparse.Namespace) -> int:
    from cms.v1 import issuer_pb2 as pb

    version = _issuer_version(args.version, newest=False)
    seed = _issuer_hsm_stub(args).CreateSeed(pb.CreateSeedRequest(version=version),
                                             timeout=DEFAULT_TIMEOUT_S)
    _print(args, seed, f"{seed.label} version={seed.version} seed_id={seed.seed_id.hex()}")
    return 0


def _issuer_kek_create(args: argparse.Namespace) -> int:
    from cms.v1 import issuer_pb2 as pb

    version = _issuer_version(args.version, newest=False)
    kek = _issuer_hsm_stub(args).CreateDeviceAuthKek(
        pb.CreateDeviceAuthKekRequest(version=version), timeout=DEFAULT_TIMEOUT_S)
    _print(args, kek, f"{kek.label} version={kek.version} kcv={kek.kcv.hex()}")
    return 0


def _issuer_stub(args: argparse.Namespace) -> Any:
    from cms.runtime.client import load_endpoints
    from cms.v1 import provider_pb2_grpc

    channel = load_endpoints(args.endpoints).channel("hsm_proxy", args.identity)
    return provider_pb2_grpc.IssuerKeysStub(channel)


def _issuer_version(version: int, *, newest: bool) -> int:
    from cms import keynames
    from cms.runtime.cli_error import CliError

    if (newest and version == 0) or version in keynames.ISSUER_KEY_VERSIONS:
        return version
    raise CliError(f"--version: 1 to 255, not {version}")


def _show_issuer_key(args: argparse.Namespace, key: Any) -> int:
    from cryptography.hazmat.primitives import serialization

    from cms.runtime.cli_error import CliError

    pem = serialization.load_der_public_key(key.public_key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if args.out is not None:
        try:
            args.out.write_bytes(pem)
        except OSError as exc:
            raise CliError(f"cannot write {args.out}: {exc.strerror}") from None
    _print(args, key, f"{key.label} version={key.version} key_id={key.key_id.hex()}\n"
                      f"{pem.decode().rstrip()}")
    return 0


def _issuer_key_create(args: argparse.Namespace) -> int:
    from cms.v1 import provider_pb2 as pb

    version = _issuer_version(args.version, newest=False)
    key = _issuer_stub(args).CreateIssuerKey(pb.CreateIssuerKeyRequest(version=version),
                                             timeout=DEFAULT_TIMEOUT_S)
    return _show_issuer_key(args, key)


def _issuer_key_show(args: argparse.Namespace) -> int:
    from cms.v1 import provider_pb2 as pb

    version = _issuer_version(args.version, newest=True)
    key = _issuer_stub(args).GetIssuerKey(pb.GetIssuerKeyRequest(version=version),
                                          timeout=DEFAULT_TIMEOUT_S)
    return _show_issuer_key(args, key)
