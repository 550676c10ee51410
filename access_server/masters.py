"""Which master versions the access server may use: only those key management transferred.

Claims 16, 27 and 28 have key management move each MK, MKRK and cryptogram
key version to HSM1. The access server uses a version only when both sides
agree it arrived that way:

- key management's record says the block was transferred to HSM1
  (``KeyManagement.ListKeyBlocks``: ``transferred``, with its check value);
- the proxy describes the key in HSM1 (``KeyBlocks.ListBlocks``) as of its
  class, landed by a transfer (origin TRANSFERRED, a tag only the proxy's
  transfer writes), matching its class's template, and with the same check
  value as key management's record.

A key that someone put into HSM1 another way (with the token PIN, say) has no
record, or no tag, or another check value: it is refused, with a message that
says which of these failed, and the refusal is logged. The proxy refuses such a
key too when CardKeys is asked to use it (and audits that); this check lets
the access server never ask. Answers are cached for ``ttl`` seconds: a
campaign's thousands of contacts cost two listings per interval, not per card.
A version the cache does not know as usable is looked up afresh (at most once
per ``MIN_REFRESH_S``), so a block transferred a moment ago is found at once.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from cms import keynames
from cms.runtime.errors import FailedPrecondition, Unavailable
from cms.runtime.logs import fields
from cms.v1 import hsm_pb2 as hpb
from cms.v1 import key_blocks_pb2 as bpb
from cms.v1 import key_mgmt_pb2 as mpb

log = logging.getLogger("access_server.masters")

PROXY_TIMEOUT_S = 10.0
DEFAULT_TTL_S = 10.0
MIN_REFRESH_S = 1.0
ROLES = {keynames.MK: hpb.MK_BLOCK, keynames.MKRK: hpb.MKRK_BLOCK,
         keynames.CRYPTOGRAM: hpb.CRYPTOGRAM_PAIR}


class MasterUnusable(FailedPrecondition):
    """A master version the access server may not use (the reason says why): an
    operator transfers it through key management, or finds out why HSM1's differs."""


@dataclass(frozen=True)
class Verdict:
    """Whether one version may be used, and if not why."""

    usable: bool
    reason: str = ""


class UsableMasters:
    def __init__(self, blocks: object, key_mgmt: object | None, *,
                 hsm1_token: str = keynames.HSM1_TOKEN, ttl: float = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.blocks = blocks            # cms.v1 KeyBlocksStub (the proxy)
        self.key_mgmt = key_mgmt        # cms.v1 KeyManagementStub, or None: not configured
        self.hsm1 = hsm1_token
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._verdicts: dict[str, Verdict] = {}
        self._at = -float("inf")

    def _refresh(self) -> dict[str, Verdict]:
        if self.key_mgmt is None:
            raise Unavailable("no key management configured (key_mgmt.address): the access "
                              "server uses only master versions key management transferred")
        try:
            records = self.key_mgmt.ListKeyBlocks(  # type: ignore[attr-defined]
                mpb.ListKeyBlocksRequest(), timeout=PROXY_TIMEOUT_S).blocks
            held = self.blocks.ListBlocks(  # type: ignore[attr-defined]
                bpb.ListBlocksRequest(token=self.hsm1, roles=list(ROLES.values())),
                timeout=PROXY_TIMEOUT_S).keys
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
            details = exc.details() if hasattr(exc, "details") else ""
            raise Unavailable(f"cannot read which master versions are usable: "
                              f"{code}: {details}") from None
        in_hsm1 = {key.label: key for key in held}
        recorded = {r.label: r for r in records}
        verdicts: dict[str, Verdict] = {}
        for label in set(in_hsm1) | set(recorded):
            verdicts[label] = self._judge(label, recorded.get(label), in_hsm1.get(label))
        return verdicts

    @staticmethod
    def _judge(label: str, record: mpb.KeyBlock | None, key: hpb.KeyInfo | None) -> Verdict:
        if key is None:
            return Verdict(False, f"{label} is not in HSM1")
        if record is None:
            return Verdict(False, f"{label} is in HSM1 but key management has no record of it")
        if not record.transferred:
            return Verdict(False, f"key management has not recorded {label} as transferred "
                                  f"to HSM1")
        if key.origin != hpb.TRANSFERRED:
            return Verdict(False, f"{label} in HSM1 was not landed by a transfer (origin "
                                  f"{hpb.KeyOrigin.Name(key.origin)})")
        if key.conformance:
            return Verdict(False, f"{label} in HSM1 does not match its class: {key.conformance}")
        if not hmac.compare_digest(bytes(key.kcv), bytes(record.kcv)):
            return Verdict(False, f"{label} in HSM1 has check value {bytes(key.kcv).hex()}, key "
                                  f"management recorded {bytes(record.kcv).hex()}")
        return Verdict(True)

    def _current(self, *, fresh: bool = False, force: bool = False) -> dict[str, Verdict]:
        with self._lock:
            age = self.clock() - self._at
            if force or age >= self.ttl or (fresh and age >= MIN_REFRESH_S):
                self._verdicts = self._refresh()
                self._at = self.clock()
            return self._verdicts

    def versions(self, kind: str, *, fresh: bool = False) -> set[int]:
        """Usable versions of ``kind`` (mk, mkrk, cryptogram); ``fresh``: not from the cache
        (an operator's request, which may follow a transfer)."""
        out = set()
        for label, verdict in self._current(force=fresh).items():
            parsed = keynames.parse_block_label(label)
            if verdict.usable and parsed is not None and parsed[0] == kind:
                out.add(parsed[1])
        return out

    def require(self, kind: str, version: int) -> None:
        """FailedPrecondition naming the reason unless version ``version`` of ``kind`` is usable."""
        label = keynames.block_label(kind, version)
        verdict = self._current().get(label)
        if verdict is None or not verdict.usable:
            verdict = self._current(fresh=True).get(label)
        verdict = verdict or Verdict(False, f"{label} is not in HSM1")
        if not verdict.usable:
            log.warning("master version refused", extra=fields(label=label,
                                                               reason=verdict.reason))
            raise MasterUnusable(f"{kind.upper()} v{version} is not usable: "
                                 f"{verdict.reason}")

    def newest(self, kind: str) -> int:
        found = self.versions(kind) or self.versions(kind, fresh=True)
        if not found:
            raise MasterUnusable(f"HSM1 holds no usable {kind} key block: create it and run "
                                 f"key management's transfer first")
        return max(found)
