"""Worker operations of the KeyBlocks contract: blocks, transfers, transport keys, ceremonies.

Every key made here gets its class's template and origin tag from
``hsm_proxy.key_classes``; nothing about attributes comes from the caller.

Where each operation runs:

- ``blocks.generate`` and ``blocks.transfer`` in any general worker (user
  sessions on every token). A transfer wraps each block in the source token
  under the trusted wrapping half of a transport key (the token enforces
  CKA_WRAP_WITH_TRUSTED) and unwraps it into the target token under the
  unwrapping half, in this one call: the wrapped block never leaves the
  worker. The landing is checked by check value before the call returns.
- ``blocks.establish`` and ``ceremony.*`` in the officer worker, which holds
  no login between steps: CKA_TRUSTED can be set only in a security officer
  session, and SO and user logins exclude each other within a process.

What is in this worker's memory (docs/threat-model.md): a ceremony's running
XOR of components, in a bytearray wiped when the ceremony completes, fails,
is cancelled or expires; the components themselves arrive as immutable
bytes. Nothing else here holds a key value: transfers and the RSA-OAEP
establishment move keys from HSM object to HSM object.
"""

from __future__ import annotations

import hmac
from typing import Any, NamedTuple

import pkcs11
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass

from cardcore.kcv import KCV_LENGTH, ZERO_BLOCK, kcv_zero_block
from cms.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ServiceError
from cms.v1 import hsm_pb2 as pb
from hsm_proxy import key_classes as kc
from hsm_proxy.backend import ResolvedKey, resolve_objects
from hsm_proxy.errors import BackendUnavailable, WireError, to_wire
from hsm_proxy.keyspec import (
    AES_SIZES,
    RSA_BITS,
    compute_kcv,
    derived_kcv,
    describe,
    finish,
    object_template,
    spki_der,
    spki_kcv,
)
from hsm_proxy.registry import State, WorkerContext, operation

OAEP_SHA1 = (Mechanism.SHA_1, MGF.SHA1, None)
IMPORT_KEY_BITS = 2048
CEREMONY_KIND = "component-ceremony"


class GenerateBlock(NamedTuple):
    token: str
    role: int
    label: str
    algorithm: int


class Transfer(NamedTuple):
    source: str
    target: str
    transport: str
    labels: tuple[str, ...]


class Establish(NamedTuple):
    source: str
    target: str
    label: str
    algorithm: int


class CeremonyBegin(NamedTuple):
    ceremony_id: str
    role: int
    label: str
    algorithm: int
    needed: int
    source: str          # "" for a factory transport master
    target: str


class CeremonyAdd(NamedTuple):
    ceremony_id: str
    component: bytes
    kcv: bytes


class Transferred(NamedTuple):
    label: str
    role: int
    kcv_source: bytes
    kcv_target: bytes
    already_present: bool


# ---------------------------------------------------------------------------
# Helpers

def _info(token: str, label: str, objects: list[pkcs11.Object], key_class: int | None = None
          ) -> bytes:
    resolved = resolve_objects(token, label, objects)
    main = resolved.main()
    info = describe(resolved.objects[main], key_class=key_class, attrs=resolved.attrs[main],
                    objects=resolved.attrs)
    info.ref.token, info.ref.label = token, label
    return info.SerializeToString()


def _require_free(ctx: WorkerContext, token: str, label: str) -> None:
    if ctx.backend.label_exists(token, label):
        raise AlreadyExists(f"a key labelled {label!r} already exists on token {token!r}")


def _destroy_quietly(objects: list[Any]) -> None:
    for obj in objects:
        try:
            obj.destroy()
        except pkcs11.PKCS11Error:
            pass


def _conforming(key: ResolvedKey, roles: set[int], origins: frozenset[int], what: str,
                half: str = "") -> kc.Tag:
    """The tag of ``key`` when it is of ``roles``, made by one of ``origins``, matching its
    template (and the transport ``half``); KeyClassError otherwise."""
    kc.require_role(key.label, roles, what)
    if key.conformance:
        raise kc.KeyClassError(f"{what} {key.label!r} on token {key.token!r} does not match "
                               f"its class: {key.conformance}")
    tag = kc.decode_tag(bytes(key.attrs[key.main()].get(Attribute.ID) or b""))
    assert tag is not None  # conformance checked it
    if tag.origin not in origins:
        allowed = " or ".join(sorted(kc.origin_name(o) for o in origins))
        raise kc.KeyClassError(f"{what} {key.label!r} on token {key.token!r} was "
                               f"{kc.origin_name(tag.origin)}; this operation takes one "
                               f"{allowed}")
    if half and tag.half != half:
        raise kc.KeyClassError(f"{what} {key.label!r} on token {key.token!r} is the "
                               f"{tag.half or 'unknown'} half of its transport key, not the "
                               f"{half} half")
    return tag


def _secret_of(key: ResolvedKey, what: str) -> pkcs11.Object:
    found = key.get(ObjectClass.SECRET_KEY)
    if found is None:
        raise FailedPrecondition(f"{what} {key.label!r} has no secret key object")
    return found[0]


# ---------------------------------------------------------------------------
# Blocks

@operation("blocks.generate", idempotent=False)
def generate_block(ctx: WorkerContext, req: GenerateBlock) -> bytes:
    kc.require_role(req.label, {req.role}, "label")
    if req.algorithm not in kc.ALGORITHMS.get(req.role, ()):
        names = ", ".join(sorted(pb.KeyAlgorithm.Name(a) for a in kc.ALGORITHMS[req.role]))
        raise InvalidArgument(f"a {kc.role_name(req.role)} is {names}")
    _require_free(ctx, req.token, req.label)
    session = ctx.backend.session(req.token)
    tag = kc.Tag(req.role, pb.GENERATED)
    objects = kc.block_template(req.role, pb.GENERATED)
    common = {"label": req.label, "tag": tag, "token_object": True}
    if req.role == pb.CRYPTOGRAM_PAIR:
        public = object_template(objects[kc.PUBLIC], **common)
        private = object_template(objects[kc.PRIVATE], **common)
        pub, priv = session.generate_keypair(KeyType.RSA, RSA_BITS[req.algorithm],
                                             capabilities=0, public_template=public,
                                             private_template=private)
        made = [pub, priv]
        key_class: int | None = pb.KEY_PAIR
    else:
        size = AES_SIZES[req.algorithm]
        template = object_template(objects[kc.SECRET], key_type=KeyType.AES, value_len=size,
                                   **common)
        made = [session.generate_key(KeyType.AES, size * 8, capabilities=0, template=template)]
        key_class = None
    ctx.backend.forget(req.token, req.label)
    return _info(req.token, req.label, made, key_class)


@operation("blocks.labels_taken", idempotent=True)
def labels_taken(ctx: WorkerContext, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Which (token, label) pairs already name an object (checked before officer work,
    whose security officer sessions cannot see private objects)."""
    return [(t, label) for t, label in pairs if ctx.backend.label_exists(t, label)]


@operation("blocks.transfer", idempotent=False)
def transfer(ctx: WorkerContext, req: Transfer) -> list[Transferred]:
    """Claims 16, 27, 28: blocks from HSM2 into HSM1 under a trusted transport key."""
    if req.source == req.target:
        raise InvalidArgument("source and target token are the same")
    wrapping_key = ctx.backend.key(req.source, req.transport)
    _conforming(wrapping_key, {pb.TRANSPORT_KEY}, kc.TRANSPORT_ORIGINS, "transport key",
                kc.WRAPPING)
    unwrapping_key = ctx.backend.key(req.target, req.transport)
    _conforming(unwrapping_key, {pb.TRANSPORT_KEY}, kc.TRANSPORT_ORIGINS, "transport key",
                kc.UNWRAPPING)
    wrapping = _secret_of(wrapping_key, "transport key")
    unwrapping = _secret_of(unwrapping_key, "transport key")
    done = []
    for label in req.labels:
        source = ctx.backend.key(req.source, label)
        role = kc.require_role(label, kc.BLOCK_ROLES, "block")
        _conforming(source, {role}, frozenset({pb.GENERATED}), "block")
        if role == pb.CRYPTOGRAM_PAIR:
            done.append(_transfer_pair(ctx, req, label, source, wrapping, unwrapping))
        else:
            done.append(_transfer_secret(ctx, req, label, role, source, wrapping, unwrapping))
    return done


def _present(ctx: WorkerContext, token: str, label: str, role: int) -> ResolvedKey | None:
    """The block already in the target under ``label`` (it must be a transferred one)."""
    if not ctx.backend.label_exists(token, label):
        return None
    ctx.backend.forget(token, label)
    key = ctx.backend.key(token, label)
    _conforming(key, {role}, frozenset({pb.TRANSFERRED}), "block already in the target")
    return key


def _transfer_secret(ctx: WorkerContext, req: Transfer, label: str, role: int,
                     source: ResolvedKey, wrapping: Any, unwrapping: Any) -> Transferred:
    obj, shape = source.get(ObjectClass.SECRET_KEY)  # type: ignore[misc]
    kcv_source = compute_kcv(obj, source.attrs[ObjectClass.SECRET_KEY], shape)
    present = _present(ctx, req.target, label, role)
    if present is not None:
        kcv_there = derived_kcv(_secret_of(present, "block"))
        if not hmac.compare_digest(kcv_there, kcv_source):
            raise FailedPrecondition(
                f"token {req.target!r} holds another key labelled {label} (KCV "
                f"{kcv_there.hex()}, the source's is {kcv_source.hex()}); it is not overwritten")
        return Transferred(label, role, kcv_source, kcv_there, True)
    wrapped = wrapping.wrap_key(obj, mechanism=Mechanism.AES_KEY_WRAP_PAD)
    template = object_template(kc.block_template(role, pb.TRANSFERRED)[kc.SECRET], label=label,
                               tag=kc.Tag(role, pb.TRANSFERRED), token_object=True,
                               key_type=KeyType.AES)
    new = unwrapping.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, wrapped,
                                mechanism=Mechanism.AES_KEY_WRAP_PAD, capabilities=0,
                                template=template)
    try:
        kcv_target = derived_kcv(new)
        if not hmac.compare_digest(kcv_target, kcv_source):
            raise FailedPrecondition(f"{label} landed in {req.target!r} with KCV "
                                     f"{kcv_target.hex()}, not {kcv_source.hex()}: the two "
                                     f"halves of the transport key differ; nothing was kept")
    except BaseException:
        _destroy_quietly([new])
        raise
    ctx.backend.forget(req.target, label)
    return Transferred(label, role, kcv_source, kcv_target, False)


def _transfer_pair(ctx: WorkerContext, req: Transfer, label: str, source: ResolvedKey,
                   wrapping: Any, unwrapping: Any) -> Transferred:
    """The private half travels wrapped (PKCS#8 under AES key wrap with padding); the
    public half is public and is made in the target from its attributes."""
    der = spki_der(source.attrs)
    if der is None or ObjectClass.PRIVATE_KEY not in source.objects:
        raise FailedPrecondition(f"block {label} is not a whole RSA key pair")
    kcv_source = spki_kcv(der)
    present = _present(ctx, req.target, label, pb.CRYPTOGRAM_PAIR)
    if present is not None:
        there = spki_der(present.attrs)
        kcv_there = spki_kcv(there) if there else b""
        if not hmac.compare_digest(kcv_there, kcv_source):
            raise FailedPrecondition(
                f"token {req.target!r} holds another key pair labelled {label}; it is not "
                f"overwritten")
        return Transferred(label, pb.CRYPTOGRAM_PAIR, kcv_source, kcv_there, True)
    public_attrs = source.attrs.get(ObjectClass.PUBLIC_KEY) or source.attrs[ObjectClass.PRIVATE_KEY]
    modulus = bytes(public_attrs[Attribute.MODULUS])
    exponent = bytes(public_attrs[Attribute.PUBLIC_EXPONENT])
    wrapped = wrapping.wrap_key(source.objects[ObjectClass.PRIVATE_KEY],
                                mechanism=Mechanism.AES_KEY_WRAP_PAD)
    objects = kc.block_template(pb.CRYPTOGRAM_PAIR, pb.TRANSFERRED)
    tag = kc.Tag(pb.CRYPTOGRAM_PAIR, pb.TRANSFERRED)
    private_template = object_template(objects[kc.PRIVATE], label=label, tag=tag,
                                       token_object=True, key_type=KeyType.RSA)
    # python-pkcs11 adds every usage attribute to an unwrap template; those of
    # public keys do not exist on a private key (DEFAULT removes them).
    for attr in (Attribute.ENCRYPT, Attribute.VERIFY, Attribute.WRAP):
        private_template[attr] = pkcs11.DEFAULT
    private_template = finish(private_template)
    made: list[Any] = []
    try:
        private = unwrapping.unwrap_key(ObjectClass.PRIVATE_KEY, KeyType.RSA, wrapped,
                                        mechanism=Mechanism.AES_KEY_WRAP_PAD, capabilities=0,
                                        template=private_template)
        made.append(private)
        landed = bytes(private[Attribute.MODULUS]).lstrip(b"\0")
        if not hmac.compare_digest(landed, modulus.lstrip(b"\0")):
            raise FailedPrecondition(f"{label} landed in {req.target!r} with another modulus: "
                                     f"the two halves of the transport key differ")
        public_template = object_template(objects[kc.PUBLIC], label=label, tag=tag,
                                          token_object=True, key_type=KeyType.RSA)
        public_template[Attribute.MODULUS] = modulus
        public_template[Attribute.PUBLIC_EXPONENT] = exponent
        made.append(ctx.backend.session(req.target).create_object(finish(public_template)))
    except BaseException:
        _destroy_quietly(made)
        raise
    ctx.backend.forget(req.target, label)
    return Transferred(label, pb.CRYPTOGRAM_PAIR, kcv_source, kcv_source, False)


# ---------------------------------------------------------------------------
# Transport key over a one-time RSA-OAEP import key (officer worker)

def _import_pair(session: Any, *, officer: bool) -> tuple[Any, Any]:
    """A session RSA pair that unwraps once: public WRAP, private UNWRAP, dies with the session.

    In a security officer session every object is public (CKA_PRIVATE false);
    the private key is still sensitive and never extractable.
    """
    return session.generate_keypair(
        KeyType.RSA, IMPORT_KEY_BITS, capabilities=0,
        public_template={Attribute.TOKEN: False, Attribute.PRIVATE: False, Attribute.WRAP: True,
                         Attribute.ENCRYPT: False, Attribute.VERIFY: False},
        private_template={Attribute.TOKEN: False, Attribute.PRIVATE: not officer,
                          Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                          Attribute.UNWRAP: True, Attribute.DECRYPT: False,
                          Attribute.SIGN: False, Attribute.DERIVE: False})


def _unwrap_checked(private: Any, wrapped: bytes, template: dict[Attribute, Any]
                    ) -> tuple[Any, bytes]:
    """Unwrap ``wrapped`` into ``template`` and, from the same bytes, into a short-lived
    session key that may encrypt: its check value is the new key's."""
    made = private.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, wrapped,
                              mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=OAEP_SHA1,
                              capabilities=0, template=template)
    try:
        probe = private.unwrap_key(
            ObjectClass.SECRET_KEY, KeyType.AES, wrapped, mechanism=Mechanism.RSA_PKCS_OAEP,
            mechanism_param=OAEP_SHA1, capabilities=0,
            template={Attribute.TOKEN: False, Attribute.PRIVATE: template[Attribute.PRIVATE],
                      Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                      Attribute.ENCRYPT: True, Attribute.DECRYPT: False, Attribute.WRAP: False,
                      Attribute.UNWRAP: False, Attribute.SIGN: False, Attribute.VERIFY: False,
                      Attribute.DERIVE: False})
        try:
            kcv = probe.encrypt(ZERO_BLOCK, mechanism=Mechanism.AES_ECB)[:KCV_LENGTH]
        finally:
            probe.destroy()
    except BaseException:
        _destroy_quietly([made])
        raise
    return made, kcv


@operation("blocks.establish", idempotent=False)
def establish(ctx: WorkerContext, req: Establish) -> tuple[bytes, bytes]:
    """A transport key generated in the source token, landed in both tokens by unwrapping.

    The key is generated as a session object in the source's SO session
    (extractable, so it can be wrapped, and dying with the session); it is
    wrapped to two one-time RSA import keys, one made in each token, and each
    token unwraps its half with the class's final template: the trusted
    wrapping half in the source (SO session, where CKA_TRUSTED can be set),
    the unwrapping half in the target. Neither half is ever extractable,
    modifiable or copyable; the check values of both halves are compared with
    the generated key's before the call returns.
    """
    kc.require_role(req.label, {pb.TRANSPORT_KEY}, "label")
    if req.algorithm not in kc.AES:
        raise InvalidArgument("a transport key is AES_128, AES_192 or AES_256")
    size = AES_SIZES[req.algorithm]
    backend = ctx.backend
    with backend.login_session(req.target) as target, \
            backend.login_session(req.source, security_officer=True) as source:
        target_pub, target_priv = _import_pair(target, officer=False)
        source_pub, source_priv = _import_pair(source, officer=True)
        target_pub_here = source.create_object({
            Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.TOKEN: False, Attribute.PRIVATE: False, Attribute.WRAP: True,
            Attribute.ENCRYPT: False, Attribute.VERIFY: False,
            Attribute.MODULUS: bytes(target_pub[Attribute.MODULUS]),
            Attribute.PUBLIC_EXPONENT: bytes(target_pub[Attribute.PUBLIC_EXPONENT])})
        key = source.generate_key(KeyType.AES, size * 8, capabilities=0, template={
            Attribute.TOKEN: False, Attribute.PRIVATE: False, Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: True, Attribute.WRAP_WITH_TRUSTED: False,
            Attribute.ENCRYPT: False, Attribute.DECRYPT: False, Attribute.WRAP: False,
            Attribute.UNWRAP: False, Attribute.SIGN: False, Attribute.VERIFY: False,
            Attribute.DERIVE: False})
        kcv = bytes(key[Attribute.CHECK_VALUE])
        made: list[Any] = []
        try:
            for_source = source_pub.wrap_key(key, mechanism=Mechanism.RSA_PKCS_OAEP,
                                              mechanism_param=OAEP_SHA1)
            for_target = target_pub_here.wrap_key(key, mechanism=Mechanism.RSA_PKCS_OAEP,
                                                   mechanism_param=OAEP_SHA1)
            key.destroy()
            wrapping, kcv_source = _unwrap_checked(source_priv, for_source, object_template(
                kc.transport_template(kc.WRAPPING), label=req.label,
                tag=kc.Tag(pb.TRANSPORT_KEY, pb.ESTABLISHED, kc.WRAPPING), token_object=True,
                key_type=KeyType.AES))
            made.append(wrapping)
            unwrapping, kcv_target = _unwrap_checked(target_priv, for_target, object_template(
                kc.transport_template(kc.UNWRAPPING), label=req.label,
                tag=kc.Tag(pb.TRANSPORT_KEY, pb.ESTABLISHED, kc.UNWRAPPING), token_object=True,
                key_type=KeyType.AES))
            made.append(unwrapping)
            if not (hmac.compare_digest(kcv_source, kcv) and hmac.compare_digest(kcv_target, kcv)):
                raise FailedPrecondition("the transport key landed with another check value; "
                                         "nothing was kept")
        except BaseException:
            _destroy_quietly(made)
            raise
    return kcv_source, kcv_target


# ---------------------------------------------------------------------------
# Key ceremony: components combined in the officer worker's memory

class Ceremony(State):
    """A key being built from custodians' components (running XOR, wiped at the end).

    The sum lives in a bytearray zeroed when the ceremony completes, fails, or
    its handle is released or expires. The components arrive as immutable
    bytes from the request, which Python cannot wipe; the threat model says so.
    """

    kind = CEREMONY_KIND

    def __init__(self, req: CeremonyBegin):
        self.begin = req
        self.token = req.target
        self.label = req.label
        self.received = 0
        self.total = bytearray(AES_SIZES[req.algorithm])

    def wipe(self) -> None:
        self.total[:] = bytes(len(self.total))

    def close(self, ctx: WorkerContext) -> None:
        self.wipe()


@operation("ceremony.begin", idempotent=False)
def ceremony_begin(ctx: WorkerContext, req: CeremonyBegin) -> None:
    if req.role not in kc.CEREMONY_ROLES:
        raise InvalidArgument("a ceremony makes a transport key or the factory transport master")
    ctx.states.put(req.ceremony_id, Ceremony(req))


@operation("ceremony.add", idempotent=False)
def ceremony_add(ctx: WorkerContext, req: CeremonyAdd
                 ) -> tuple[int, int, dict[str, bytes], WireError | None]:
    """Add one component; on the last, create the key in its tokens.

    A rejected component raises (INVALID_ARGUMENT) and leaves the ceremony
    waiting for it. A failure while creating the combined key ends the
    ceremony (the state is dropped, the sum wiped) and comes back as the
    fourth element, so the frontend ends its record too.
    """
    state = ctx.states.get(req.ceremony_id, Ceremony)
    size = len(state.total)
    if len(req.component) != size:
        raise InvalidArgument(f"a component of {pb.KeyAlgorithm.Name(state.begin.algorithm)} "
                              f"is {size} bytes, got {len(req.component)}")
    position = state.received + 1
    if not hmac.compare_digest(kcv_zero_block(req.component), req.kcv):
        raise InvalidArgument(f"component {position} of {state.begin.needed}: its check value "
                              f"does not match; the component was not accepted, enter it again")
    for i, byte in enumerate(req.component):
        state.total[i] ^= byte
    state.received = position
    if state.received < state.begin.needed:
        return state.received, state.begin.needed, {}, None
    ctx.states.pop(req.ceremony_id)
    try:
        return state.received, state.begin.needed, _create_combined(ctx, state), None
    except ServiceError as exc:
        return state.received, state.begin.needed, {}, to_wire(exc)
    except pkcs11.PKCS11Error as exc:
        from hsm_proxy.backend import failure_name, is_backend_failure
        from hsm_proxy.worker import map_pkcs11_error

        if is_backend_failure(exc):
            ctx.backend.fail(exc)
            error: ServiceError = BackendUnavailable(
                f"HSM backend failed while creating the combined key ({failure_name(exc)}); "
                f"the ceremony is over, begin a new one")
        else:
            error = map_pkcs11_error(exc, "AddComponent")
        return state.received, state.begin.needed, {}, to_wire(error)
    finally:
        state.wipe()


def _combined_template(tpl: kc.ObjectTemplate, label: str, tag: kc.Tag, value: bytearray
                       ) -> dict[Attribute, Any]:
    template = object_template(tpl, label=label, tag=tag, token_object=True,
                               key_type=KeyType.AES)
    template[Attribute.VALUE] = bytes(value)
    # SoftHSM checks a given check value against the key and refuses a wrong one:
    # the stored value is then one the HSM vouches for.
    template[Attribute.CHECK_VALUE] = kcv_zero_block(bytes(value))
    return finish(template)


def _create_combined(ctx: WorkerContext, state: Ceremony) -> dict[str, bytes]:
    begin = state.begin
    backend = ctx.backend
    kcv = kcv_zero_block(bytes(state.total))
    if begin.role == pb.FACTORY_TRANSPORT_MASTER:
        with backend.login_session(begin.target) as target:
            target.create_object(_combined_template(
                kc.FACTORY_MASTER_TEMPLATE, begin.label,
                kc.Tag(pb.FACTORY_TRANSPORT_MASTER, pb.CEREMONY), state.total))
        return {begin.target: kcv}
    with backend.login_session(begin.target) as target, \
            backend.login_session(begin.source, security_officer=True) as source:
        wrapping = source.create_object(_combined_template(
            kc.transport_template(kc.WRAPPING), begin.label,
            kc.Tag(pb.TRANSPORT_KEY, pb.CEREMONY, kc.WRAPPING), state.total))
        try:
            target.create_object(_combined_template(
                kc.transport_template(kc.UNWRAPPING), begin.label,
                kc.Tag(pb.TRANSPORT_KEY, pb.CEREMONY, kc.UNWRAPPING), state.total))
        except BaseException:
            _destroy_quietly([wrapping])
            raise
    return {begin.source: kcv, begin.target: kcv}
