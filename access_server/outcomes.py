"""Every way a card contact can end, and who acts next: the next contact, or an operator.

A contact ends with a ``SessionDone`` whose ``outcome`` says what happened and
whose ``reason`` (a code below) says why. Each reason belongs to one class:

- *retry later* (``RETRY_LATER``): nothing is wrong with the card or the
  system's settings; the next contact (the agent retries with its backoff)
  can succeed as it is;
- *needs an operator* (``FAILED``, ``REFUSED``): the next contact would end
  the same way, every time, until someone changes something.

A needs-an-operator ending that is the card's own (it refuses the secured
script, offers too low a security level, answers other than foreseen) is
recorded on the card (``Store.flag_attention``: ``cms psd show``, its history,
its campaign items failed "needing attention", the metrics), and no campaign
picks the card until an operator clears it (``cms psd clear-attention``). It
is recorded only once the card has proven, in that contact, that it holds the
keys of its channel (the proxy verified its card cryptogram for this
contact's fresh host challenge): the same rule as every other registry write
of a user PC's contact, so an agent that replays a card's CPLC cannot flag
it. Endings the card proved nothing in, and faults of the system rather than
of the card (the proxy's policy, a master key not transferred), are logged
and counted (``cms_access_contacts_total``) but not recorded on the card:
the fix is elsewhere, and the card's next contact after it works. So is an
answer that fails its check (an R-MAC, a key check value): it is not the card's
word, whoever altered it, and the next honest contact settles what the card holds.

docs/flows.md has the table; a test checks that it lists every reason here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from prometheus_client import Counter

from cms.v1 import card_channel_pb2 as pb


class Next(StrEnum):
    RETRY = "retry later"
    OPERATOR = "needs an operator"


@dataclass(frozen=True)
class Reason:
    code: str
    outcome: int            # SessionDone.Outcome
    recorded: bool          # flagged on the card (after the card proved its keys)

    @property
    def next(self) -> Next:
        return Next.RETRY if self.outcome == pb.SessionDone.RETRY_LATER else Next.OPERATOR


def _reason(code: str, outcome: int, *, recorded: bool = False) -> Reason:
    reason = Reason(code, outcome, recorded)
    REASONS[code] = reason
    return reason


REASONS: dict[str, Reason] = {}
_RETRY, _FAILED, _REFUSED = (pb.SessionDone.RETRY_LATER, pb.SessionDone.FAILED,
                             pb.SessionDone.REFUSED)

DONE = _reason("done", pb.SessionDone.OK)
NOTHING_TO_DO = _reason("nothing_to_do", pb.SessionDone.NOTHING_TO_DO)

# -- retry later ------------------------------------------------------------------
CARD_ABSENT = _reason("card_absent", _RETRY)
"""The card went away, the reader failed, or the card lost the session between the scripts."""
CARD_BUSY = _reason("card_busy", _RETRY)
"""Another session holds the card's lease."""
REGISTRY_MOVED = _reason("registry_moved", _RETRY)
"""The registry changed while this contact checked the card (Aborted)."""
UNAVAILABLE = _reason("unavailable", _RETRY)
"""The proxy, key management or the database did not answer in time."""

# -- needs an operator, recorded on the card ----------------------------------------
SECURITY_LEVEL = _reason("security_level", _FAILED, recorded=True)
"""The card's "i" offers no level that has the configured minimum's protections."""
CARD_REFUSED = _reason("card_refused", _FAILED, recorded=True)
"""The card refused a secured command (EXTERNAL AUTHENTICATE included) with a status word."""
KEY_VERSIONS = _reason("key_versions", _FAILED, recorded=True)
"""The card holds MK versions the registry does not explain."""
CARD_CHALLENGE = _reason("card_challenge", _FAILED, recorded=True)
"""A pseudo-random card challenge its sequence counter and AID do not make."""

# -- needs an operator, not recorded on the card --------------------------------------
ANSWER_MISMATCH = _reason("answer_mismatch", _FAILED)
"""A secured answer is not the one the HSM foresaw (R-MAC, or other key check values):
what failed its check is not the card's word, and the next honest contact's probe settles
what the card holds."""
PROBE_REFUSED = _reason("probe_refused", _FAILED)
"""SELECT, GET DATA or INITIALIZE UPDATE refused with a status word."""
PROBE_MALFORMED = _reason("probe_malformed", _FAILED)
"""The CPLC, the key information or the INITIALIZE UPDATE answer does not parse."""
SCP_VERSION = _reason("scp_version", _FAILED)
"""INITIALIZE UPDATE answered with another protocol than SCP03, or another key version."""
KEY_SET_MISSING = _reason("key_set_missing", _FAILED)
"""The card lacks the key set the flow opens its channel with."""
CARD_CRYPTOGRAM = _reason("card_cryptogram", _FAILED)
"""The card cryptogram does not verify with the keys HSM1 derives for the card."""
PROXY_REFUSED = _reason("proxy_refused", _FAILED)
"""The proxy's policy refused the access server (PERMISSION_DENIED)."""
HSM_KEY_MISSING = _reason("hsm_key_missing", _FAILED)
"""A master key block the flow needs is not in HSM1 (the proxy's NOT_FOUND)."""
MASTER_UNUSABLE = _reason("master_unusable", _FAILED)
"""A master version key management did not transfer, or whose check value differs."""
PROXY_ERROR = _reason("proxy_error", _FAILED)
"""The proxy failed the request otherwise."""
REGISTRY_REFUSED = _reason("registry_refused", _FAILED)
"""The registry refused the step (a rule of the store)."""
AGENT_ERROR = _reason("agent_error", _FAILED)
"""The agent could not run the script, or sent a result no card gives."""

# -- refused: the server does no work on the card -------------------------------------
NOT_REGISTERED = _reason("not_registered", _REFUSED)
REVOKED = _reason("revoked", _REFUSED)
NEEDS_ATTENTION = _reason("needs_attention", _REFUSED)
"""The card is flagged: an operator clears it once the cause is dealt with."""

CONTACTS = Counter("cms_access_contacts_total",
                   "Card contacts by how they ended: outcome, reason and who acts next",
                   ["outcome", "reason", "next"])


def count(done: pb.SessionDone) -> None:
    """One ended contact in ``cms_access_contacts_total``."""
    reason = REASONS.get(done.reason)
    CONTACTS.labels(pb.SessionDone.Outcome.Name(done.outcome), done.reason or "unknown",
                    reason.next.value if reason is not None else Next.OPERATOR.value).inc()
