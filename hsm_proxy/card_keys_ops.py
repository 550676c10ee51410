"""Worker operations of the CardKeys contract: card key sets and SCP03 channels.

A card key set (ENC, MAC, DEK) is derived inside the HSM with
CKM_AES_ECB_ENCRYPT_DATA from a master key block and a derivation element
(``cardcore.diversify``): the PSD id for MK and transport sets, a random R for
the MKRK set. The derived keys are session objects: sensitive, extractable
only by wrapping, destroyed when their handle ends.

What is in this worker's memory, and for how long (see docs/threat-model.md):

- R: made by the HSM's generator (C_GenerateRandom) or recovered by RSA-OAEP
  C_Decrypt of the stored cryptogram; held in a bytearray only while the
  derivation data is computed, then zeroed. (The SHA-256 inside
  ``derivation_data`` sees it too, in immutable buffers Python cannot wipe.)
- SCP03 session keys: a software HSM has no SP 800-108 KDF, so they are
  AES-CMAC outputs of the static ENC/MAC keys computed in the HSM. They live
  in the channel's state in this worker until the channel is closed or its
  handle expires, and never cross the process boundary.
- PUT KEY key data: C_WrapKey(CKM_AES_CBC, zero IV) of each new key under the
  channel's static DEK, made by the HSM: the new keys never exist in clear
  outside it. KCVs (AES-ECB of 16 x 01, first 3 bytes) by C_Encrypt in the HSM.

Masters (``hsm_proxy.key_classes``): a card key set is derived only from a
master of the class its source names (an MK block or the factory transport
master diversified by the PSD id; an MKRK block with a cryptogram key pair
for R), which reached this token the way its class does (transferred under
a trusted transport key, or from a custodians' ceremony) and matches its
template. Derived keys are session objects that never leave this worker's
operation: those of the channel are not extractable; those a PUT KEY
installs are extractable only so the card's DEK can wrap them, inside the
same operation, and are destroyed straight after.
"""

from __future__ import annotations

from typing import Any, assert_never

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from cardcore import gp
from cardcore.diversify import KEY_INDEXES, derivation_data
from cardcore.kcv import KCV_INPUT, KCV_LENGTH
from cardcore.scp03 import (
    CardChallengeError,
    CryptogramError,
    HostChannel,
    MacError,
    Scp03Error,
    open_host_channel,
)
from cardcore.sw import SW
from cms.runtime.errors import FailedPrecondition, InvalidArgument
from cms.v1 import hsm_pb2 as pb
from hsm_proxy import card_keys_messages as cm
from hsm_proxy import key_classes as kc
from hsm_proxy.errors import DataLoss
from hsm_proxy.keyspec import session_secret_template
from hsm_proxy.registry import State, WorkerContext, operation

OAEP_SHA1 = (Mechanism.SHA_1, pkcs11.MGF.SHA1, None)
R_BYTES = 16
ZERO_IV = bytes(16)
# A channel's static keys: CMAC (session keys), WRAP (the DEK wraps PUT KEY data),
# ENCRYPT (check values). A PUT KEY's new keys: ENCRYPT for their check values.
CHANNEL_USAGES = frozenset({pb.ENCRYPT, pb.SIGN, pb.WRAP})
PUT_USAGES = frozenset({pb.ENCRYPT})


class KeySetObjects:
    """ENC, MAC, DEK objects of one card key set; ``owned`` ones are destroyed at the end."""

    def __init__(self, token: str, key_length: int, objects: list[Any], owned: bool) -> None:
        self.token = token
        self.key_length = key_length
        self.enc, self.mac, self.dek = objects
        self.owned = owned

    def destroy(self) -> None:
        if not self.owned:
            return
        for obj in (self.enc, self.mac, self.dek):
            try:
                obj.destroy()
            except pkcs11.PKCS11Error:
                pass


class KeySetState(State):
    kind = "card-key-set"

    def __init__(self, keys: KeySetObjects, label: str) -> None:
        self.keys = keys
        self.token = keys.token
        self.label = label

    def close(self, ctx: WorkerContext) -> None:
        self.keys.destroy()


class ChannelState(State):
    """An open SCP03 channel: its static key set and the host end (session keys)."""

    kind = "scp03-channel"

    def __init__(self, keys: KeySetObjects, host: HostChannel, label: str) -> None:
        self.keys = keys
        self.host: HostChannel | None = host
        self.pending: list = []          # checkpoints of wrapped commands not yet answered
        self.base = host.checkpoint()    # the state before the first pending command
        self.token = keys.token
        self.label = label

    def close(self, ctx: WorkerContext) -> None:
        self.host = None
        self.pending.clear()
        self.keys.destroy()


def _master(ctx: WorkerContext, token: str, label: str, roles: set[int],
            cls: ObjectClass = ObjectClass.SECRET_KEY) -> Any:
    """The object of a master of ``roles`` that CardKeys may use (see the module docstring);
    KeyClassError (PERMISSION_DENIED, audited) for any other key under that label."""
    key = ctx.backend.key(token, label)
    role = kc.require_role(label, roles, "master")
    if key.conformance:
        raise kc.KeyClassError(f"{token}/{label} does not match its class, CardKeys will "
                               f"not use it: {key.conformance}")
    tag = kc.decode_tag(bytes(key.attrs[key.main()].get(Attribute.ID) or b""))
    origins = kc.CARD_MASTER_ORIGINS[role]
    if tag is None or tag.origin not in origins:
        made = kc.origin_name(tag.origin) if tag is not None else "unknown"
        allowed = " or ".join(sorted(kc.origin_name(o) for o in origins))
        raise kc.KeyClassError(f"{token}/{label} was {made}; CardKeys uses a "
                               f"{kc.role_name(role)} only when {allowed}")
    found = key.get(cls)
    if found is None:
        raise FailedPrecondition(f"{token}/{label} has no {cls.name.lower().replace('_', ' ')}")
    return found[0]


def _derive(master: Any, element: bytearray | bytes, key_length: int, token: str, *,
            for_put: bool) -> KeySetObjects:
    template = session_secret_template(PUT_USAGES if for_put else CHANNEL_USAGES,
                                       extractable=for_put, value_len=key_length)
    objects = []
    try:
        for index in KEY_INDEXES:
            objects.append(master.derive_key(
                KeyType.AES, key_length * 8, capabilities=0,
                mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
                mechanism_param=derivation_data(bytes(element), index, key_length),
                template=template))
    except pkcs11.PKCS11Error as exc:
        for obj in objects:
            obj.destroy()
        raise FailedPrecondition(f"the HSM refused to derive the card key set "
                                 f"({type(exc).__name__}); the master key needs DERIVE") from None
    return KeySetObjects(token, key_length, objects, owned=True)


def _wipe(secret: bytearray) -> None:
    secret[:] = bytes(len(secret))


MK_SOURCES = {pb.MK_BLOCK, pb.FACTORY_TRANSPORT_MASTER}
MKRK_SOURCES = {pb.MKRK_BLOCK}
CRYPTOGRAM = {pb.CRYPTOGRAM_PAIR}


def key_set(ctx: WorkerContext, src: cm.KeySetSource, *, for_put: bool = False
            ) -> tuple[KeySetObjects, bytes]:
    """The key set objects of ``src`` and, for a new random MKRK set, its cryptogram.

    ``for_put``: the set is to be installed by a PUT KEY (its keys are then
    extractable for the DEK wrap, in this operation only).
    """
    match src:
        case cm.KeySetHandle():
            if for_put:
                raise InvalidArgument("a key set handle opens channels; a PUT KEY derives the "
                                      "set it installs inside the call (give its source)")
            return ctx.states.get(src.handle, KeySetState).keys, b""
        case cm.Diversified():
            master = _master(ctx, src.token, src.master_label, MK_SOURCES)
            return _derive(master, src.element, src.key_length, src.token,
                           for_put=for_put), b""
        case cm.NewRandom():
            return _new_random(ctx, src, for_put)
        case cm.FromCryptogram():
            return _from_cryptogram(ctx, src, for_put)
        case _:
            assert_never(src)


def _new_random(ctx: WorkerContext, src: cm.NewRandom, for_put: bool
                ) -> tuple[KeySetObjects, bytes]:
    """An MKRK set from a new R made by the HSM, and R encrypted to the cryptogram key."""
    master = _master(ctx, src.token, src.master_label, MKRK_SOURCES)
    session = ctx.backend.session(src.token)
    public = _master(ctx, src.token, src.public_label, CRYPTOGRAM, ObjectClass.PUBLIC_KEY)
    r = bytearray(session.generate_random(R_BYTES * 8))
    try:
        cryptogram = public.encrypt(bytes(r), mechanism=Mechanism.RSA_PKCS_OAEP,
                                    mechanism_param=OAEP_SHA1)
        return _derive(master, r, src.key_length, src.token, for_put=for_put), cryptogram
    finally:
        _wipe(r)


def _from_cryptogram(ctx: WorkerContext, src: cm.FromCryptogram, for_put: bool
                     ) -> tuple[KeySetObjects, bytes]:
    """The MKRK set of a card again, from the R its stored cryptogram holds."""
    master = _master(ctx, src.token, src.master_label, MKRK_SOURCES)
    private = _master(ctx, src.token, src.private_label, CRYPTOGRAM, ObjectClass.PRIVATE_KEY)
    try:
        r = bytearray(private.decrypt(src.cryptogram, mechanism=Mechanism.RSA_PKCS_OAEP,
                                      mechanism_param=OAEP_SHA1))
    except pkcs11.PKCS11Error:
        raise FailedPrecondition(f"the cryptogram does not decrypt with {src.private_label}: "
                                 f"it was made with another key") from None
    try:
        if len(r) != R_BYTES:
            raise FailedPrecondition("the cryptogram does not hold a derivation random")
        return _derive(master, r, src.key_length, src.token, for_put=for_put), b""
    finally:
        _wipe(r)


def _master_label(src: cm.KeySetSource) -> str:
    """The master a state's keys were derived from; none for a set taken from a handle."""
    return "" if isinstance(src, cm.KeySetHandle) else src.master_label


def _kcv(obj: Any) -> bytes:
    return obj.encrypt(KCV_INPUT, mechanism=Mechanism.AES_ECB)[:KCV_LENGTH]


def kcvs(keys: KeySetObjects) -> tuple[bytes, bytes, bytes]:
    try:
        return _kcv(keys.enc), _kcv(keys.mac), _kcv(keys.dek)
    except pkcs11.PKCS11Error:
        return b"", b"", b""


def _put_key(ctx: WorkerContext, dek: Any, command: cm.Command) -> cm.Wrapped:
    """PUT KEY of a whole set, its key data wrapped under the channel's DEK by the HSM."""
    new, cryptogram = key_set(ctx, command.put, for_put=True)
    try:
        comps = []
        for obj in (new.enc, new.mac, new.dek):
            encrypted = dek.wrap_key(obj, mechanism=Mechanism.AES_CBC, mechanism_param=ZERO_IV)
            comps.append(gp.KeyComponent(encrypted, new.key_length, _kcv(obj)))
        apdu = gp.put_key_command(command.new_kvn, comps, replace_kvn=command.replace_kvn)
        kcv_values = tuple(c.kcv for c in comps)
        expected = gp.put_key_response(command.new_kvn, kcv_values)
        return cm.Wrapped(apdu, expected, (command.new_kvn, *kcv_values), cryptogram)
    except pkcs11.PKCS11Error as exc:
        raise FailedPrecondition(f"the HSM refused to wrap the new key set under the card's "
                                 f"DEK ({type(exc).__name__})") from None
    finally:
        new.destroy()


def _wrap_commands(ctx: WorkerContext, state: ChannelState,
                   commands: tuple[cm.Command, ...]) -> list[cm.Wrapped]:
    assert state.host is not None
    plain = [(_put_key(ctx, state.keys.dek, c) if c.put is not None else cm.Wrapped(c.apdu))
             for c in commands]
    out = []
    if not state.pending:
        state.base = state.host.checkpoint()
    try:
        for item in plain:
            wrapped = state.host.wrap(item.apdu)
            state.pending.append(state.host.checkpoint())
            out.append(item._replace(apdu=wrapped))
    except (Scp03Error, ValueError) as exc:
        raise InvalidArgument(f"a command cannot be wrapped: {exc}") from None
    return out


@operation("card_keys.derive_set", idempotent=False)
def derive_set(ctx: WorkerContext, req: cm.DeriveSet) -> tuple[bytes, bytes, bytes, bytes]:
    keys, cryptogram = key_set(ctx, req.source)
    ctx.states.put(req.handle, KeySetState(keys, _master_label(req.source)))
    return (*kcvs(keys), cryptogram)


@operation("card_keys.open", idempotent=False)
def open_channel(ctx: WorkerContext, req: cm.OpenChannel) -> list[cm.Wrapped]:
    keys, cryptogram = key_set(ctx, req.source)
    owned_here = not isinstance(req.source, cm.KeySetHandle)
    try:
        def prf(obj: Any):
            return lambda data: obj.sign(data, mechanism=Mechanism.AES_CMAC)

        try:
            host, ext_auth = open_host_channel(
                prf(keys.enc), prf(keys.mac), req.host_challenge, req.initialize_update_response,
                key_length=keys.key_length, security_level=req.security_level, kvn=req.kvn,
                aid=req.aid)
        except CardChallengeError as exc:
            # The cryptogram verified: the card holds the keys, but its pseudo-random
            # challenge was not made for the security domain the caller named.
            raise FailedPrecondition(f"card challenge mismatch: {exc} (wrong AID, or not "
                                     f"this card's counter)") from None
        except CryptogramError:
            raise FailedPrecondition("card cryptogram mismatch: wrong key set or not this "
                                     "card") from None
        except (Scp03Error, ValueError) as exc:
            raise InvalidArgument(f"initialize_update_response: {exc}") from None
        except pkcs11.PKCS11Error as exc:
            raise FailedPrecondition(f"the HSM refused AES-CMAC with the card's static keys "
                                     f"({type(exc).__name__})") from None
        state = ChannelState(keys if owned_here else KeySetObjects(
            keys.token, keys.key_length, [keys.enc, keys.mac, keys.dek], owned=False),
            host, _master_label(req.source))
        state.pending.append(host.checkpoint())
        wrapped = [cm.Wrapped(ext_auth, cryptogram=cryptogram)]
        wrapped += _wrap_commands(ctx, state, req.commands)
    except BaseException:
        if owned_here:
            keys.destroy()
        raise
    if req.predict:
        return _predicted(ctx, state, req.commands, wrapped)
    ctx.states.put(req.handle, state)
    return wrapped


def _predicted(ctx: WorkerContext, state: ChannelState, commands: tuple[cm.Command, ...],
               wrapped: list[cm.Wrapped]) -> list[cm.Wrapped]:
    """Each command with the exact answer the card must send, and the channel closed.

    What a successful card answers is known here: EXTERNAL AUTHENTICATE a bare
    9000, a PUT KEY its KVN and KCVs, a DELETE its confirmation byte
    (``gp.foreseen_answer``); a channel with any other command is refused.
    The answers can then be checked by comparison, and the session keys live
    only for this call.
    """
    host = state.host
    assert host is not None
    try:
        out = [wrapped[0]._replace(expected_response=host.expected_response(
            b"", SW.OK, state.pending[0]))]
        for index, (item, command, checkpoint) in enumerate(
                zip(wrapped[1:], commands, state.pending[1:], strict=True)):
            answer = (item.expected_put_key_response if command.put is not None
                      else gp.foreseen_answer(command.apdu))
            if answer is None:
                raise InvalidArgument(f"commands[{index}]: the answer to this command cannot "
                                      f"be foreseen; open the channel without "
                                      f"predict_responses")
            out.append(item._replace(expected_response=host.expected_response(
                answer, SW.OK, checkpoint)))
        return out
    finally:
        state.close(ctx)


@operation("card_keys.wrap", idempotent=False)
def wrap(ctx: WorkerContext, req: cm.Wrap) -> list[cm.Wrapped]:
    state = ctx.states.get(req.handle, ChannelState)
    if state.host is None:
        raise FailedPrecondition("the channel is closed")
    return _wrap_commands(ctx, state, req.commands)


@operation("card_keys.unwrap", idempotent=False)
def unwrap(ctx: WorkerContext, req: cm.Unwrap) -> list[tuple[bytes, int]]:
    """Check each response against the state after its command; resync to the last one."""
    state = ctx.states.get(req.handle, ChannelState)
    host = state.host
    if host is None:
        raise FailedPrecondition("the channel is closed")
    if len(req.responses) > len(state.pending):
        raise InvalidArgument(f"{len(req.responses)} responses for {len(state.pending)} "
                              f"wrapped commands awaiting an answer")
    out = []
    for (data, sw), checkpoint in zip(req.responses, state.pending, strict=False):
        try:
            out.append(host.unwrap(bytes(data) + sw.to_bytes(2, "big"), checkpoint))
        except MacError:
            state.close(ctx)
            raise DataLoss("a response failed its R-MAC check: the channel is closed") from None
        except Scp03Error as exc:
            state.close(ctx)
            raise DataLoss(f"a response cannot be decrypted ({exc}): the channel is "
                           f"closed") from None
    host.resync(state.pending[len(req.responses) - 1] if req.responses else state.base)
    # Commands after the last answered one never reached the card.
    state.pending.clear()
    if req.close:
        # In this same call, not a release message after it: a card contact
        # then costs the frontend one worker round trip less.
        ctx.release([req.handle])
    return out

