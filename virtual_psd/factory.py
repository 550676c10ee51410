"""Factory state of a virtual PSD: its unique id and transport key set.

Two kinds of transport keys:

* ``default``: the GlobalPlatform test keys 40 41 42 ... for ENC, MAC and
  DEK, so third-party GlobalPlatform hosts can talk to the card;
* per card: ENC/MAC/DEK diversified (``cms-psd-kdf/1``) from a factory
  transport master key and the PSD id. The issuer holds that master key in its
  HSM and derives the same keys there.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cardcore.diversify import diversify_key_set_software
from cardcore.psd import ISD_AID, Kvn, cplc_for_psd_id, normalize_psd_id, psd_id_bytes
from cardcore.scp03 import Scp03Error, check_i_parameter
from virtual_psd.isd import IsdState, KeySet
from virtual_psd.state import CardState, save_state

DEFAULT_SCP_I = 0x70
"""Pseudo-random challenges, R-MAC and R-ENCRYPTION: every level up to 33."""


def default_transport_keys(key_length: int = 16) -> KeySet:
    """GlobalPlatform's well-known test keys (40 41 42 ...), same for ENC/MAC/DEK."""
    if key_length not in (16, 24, 32):
        raise ValueError("key length must be 16, 24 or 32")
    key = bytes(range(0x40, 0x40 + key_length))
    return KeySet(key, key, key)


def diversified_transport_keys(master_key: bytes, psd_id: str, key_length: int = 16) -> KeySet:
    ks = diversify_key_set_software(master_key, psd_id_bytes(psd_id), key_length)
    return KeySet(ks.enc, ks.mac, ks.dek)


def new_card_state(*, psd_id: str | None = None, transport_master: bytes | None = None,
                   key_length: int = 16, scp_i: int = DEFAULT_SCP_I,
                   strict: bool = False) -> CardState:
    """A fresh card as it leaves the factory (random unique id when none is given).

    ``scp_i`` is the SCP03 "i" the card announces and lives by (which security
    levels it accepts, random or pseudo-random challenges, S16): one Amendment D
    defines, else ValueError. ``strict``: the security executive manages MK sets
    only in a channel opened with the MKRK set once the card holds one
    (``virtual_psd/isd.py``), as a card that enforces the seed's rule to the
    letter does.
    """
    try:
        check_i_parameter(scp_i)
    except Scp03Error as exc:
        raise ValueError(str(exc)) from None
    pid = normalize_psd_id(psd_id) if psd_id else secrets.token_bytes(10).hex().upper()
    keys = (default_transport_keys(key_length) if transport_master is None
            else diversified_transport_keys(transport_master, pid, key_length))
    isd = IsdState(key_sets={Kvn.TRANSPORT: keys}, scp_i=scp_i, strict=strict)
    return CardState(psd_id=pid, cplc=cplc_for_psd_id(psd_id_bytes(pid)),
                     sections={ISD_AID: isd})


def create_card(path: str | os.PathLike[str], *, force: bool = False,
                **kwargs: object) -> CardState:
    """Write a new card's state file; refuses to overwrite unless ``force``."""
    target = Path(path)
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists")
    state = new_card_state(**kwargs)  # type: ignore[arg-type]
    target.parent.mkdir(parents=True, exist_ok=True)
    save_state(target, state)
    os.chmod(target, 0o600)
    return state
