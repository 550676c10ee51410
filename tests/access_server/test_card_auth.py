"""The issuer and a personalized card authenticate each other through the access server
(claims 13 and 14): virtual cards initialized for the proxy's issuer key, issued and
personalized as in test_issuance_cards, the bureau's results imported, then AUTHENTICATE
checked by the access server against the card's stock record and VERIFY ISSUER answered
by the proxy's IssuerHsm with the card's wrapped device authentication key.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from access_server.card_auth import Challenges
from cardcore import issuance as I
from cardcore.apdu import parse_response
from cardcore.sw import SW
from cms.runtime.client import load_endpoints
from cms.runtime.errors import FailedPrecondition, ResourceExhausted
from cms.v1 import issuance_pb2 as pb
from cms.v1 import issuance_pb2_grpc
from tests.access_server.test_issuance import PEM, Issuer, make_bureau, results
from tests.access_server.test_issuance_cards import issued_cards, issuer, personalize, proxy
from tests.support.hsm_proxy import ProxyProcess
from tests.virtual_psd.issuance_host import open_card, select_applet

pytestmark = pytest.mark.integration
__all__ = ["issuer", "proxy"]

SERIALS = ["ACME-M-001", "ACME-M-002", "ACME-M-003"]


def refused(call: Callable[[], object], code: grpc.StatusCode, text: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() is code, caught.value.details()
    assert text in caught.value.details()


def card_answer(path: Path, challenge: bytes) -> bytes:
    card = open_card(path)
    select_applet(card)
    signature, sw = parse_response(card.transmit(I.authenticate(challenge)))
    assert sw == SW.OK
    return signature


def verify_issuer(path: Path, serial: str, stub: issuance_pb2_grpc.IssuanceStub,
                  signer: str | None = None) -> int:
    """GET CHALLENGE on the card, the issuer's signature for ``signer``'s card (by default
    the card's own) over it, VERIFY ISSUER's status word."""
    card = open_card(path)
    select_applet(card)
    challenge, sw = parse_response(card.transmit(I.get_challenge()))
    assert sw == SW.OK
    signature = stub.AuthenticateToCard(pb.AuthenticateToCardRequest(
        serial=signer or serial, challenge=challenge), timeout=60).signature
    return parse_response(card.transmit(I.verify_issuer(signature)))[1]


def test_issuer_and_card_authenticate_each_other(proxy: ProxyProcess, issuer: Issuer) -> None:
    cards, table = issued_cards(proxy, issuer, SERIALS, "MUTUAL")
    first, second = (row.serial for row in table.rows)
    stock_only = SERIALS[2]
    stub = issuance_pb2_grpc.IssuanceStub(
        load_endpoints(issuer.endpoints).channel("access_server", "admin"))

    # Issued but not yet personalized in the issuer's records: no authentication.
    refused(lambda: stub.BeginCardAuthentication(
        pb.BeginCardAuthenticationRequest(serial=first), timeout=30),
        grpc.StatusCode.FAILED_PRECONDITION, f"card {first} is not personalized: it is issued")
    for row in table.rows:
        assert personalize(cards[row.serial], row.payload) == SW.OK
    bureau = make_bureau("bureau-1")
    (issuer.directory / "bureau.pem").write_bytes(bureau.certificate.public_bytes(PEM))
    issuer.cms("bureaus", "trust", "--cert", str(issuer.directory / "bureau.pem"))
    data = results(table.header.file_serial, "bureau-1",
                   [(first, "personalized", ""), (second, "personalized", "")])
    (issuer.directory / "results.csv").write_bytes(data)
    (issuer.directory / "results.csv.p7s").write_bytes(bureau.sign(data))
    issuer.cms("issue", "results", str(issuer.directory / "results.csv"))

    # AUTHENTICATE: the card's answer verifies once; a replay finds no challenge.
    begun = stub.BeginCardAuthentication(pb.BeginCardAuthenticationRequest(serial=first),
                                         timeout=30)
    assert len(begun.challenge) == 32
    answer = card_answer(cards[first], bytes(begun.challenge))
    verify = pb.VerifyCardAuthenticationRequest(serial=first, challenge_id=begun.challenge_id,
                                                signature=answer)
    assert stub.VerifyCardAuthentication(verify, timeout=30).serial == first
    refused(lambda: stub.VerifyCardAuthentication(verify, timeout=30),
            grpc.StatusCode.FAILED_PRECONDITION, "unknown, used or expired")

    # Another card's key answering the first card's challenge is refused, and the
    # challenge is spent: the right answer after it is refused too.
    begun = stub.BeginCardAuthentication(pb.BeginCardAuthenticationRequest(serial=first),
                                         timeout=30)
    wrong = card_answer(cards[second], bytes(begun.challenge))
    refused(lambda: stub.VerifyCardAuthentication(pb.VerifyCardAuthenticationRequest(
        serial=first, challenge_id=begun.challenge_id, signature=wrong), timeout=30),
        grpc.StatusCode.PERMISSION_DENIED, "does not verify")
    right = card_answer(cards[first], bytes(begun.challenge))
    refused(lambda: stub.VerifyCardAuthentication(pb.VerifyCardAuthenticationRequest(
        serial=first, challenge_id=begun.challenge_id, signature=right), timeout=30),
        grpc.StatusCode.FAILED_PRECONDITION, "unknown, used or expired")

    # A challenge is for its card only.
    begun = stub.BeginCardAuthentication(pb.BeginCardAuthenticationRequest(serial=second),
                                         timeout=30)
    refused(lambda: stub.VerifyCardAuthentication(pb.VerifyCardAuthenticationRequest(
        serial=first, challenge_id=begun.challenge_id,
        signature=card_answer(cards[first], bytes(begun.challenge))), timeout=30),
        grpc.StatusCode.FAILED_PRECONDITION, "unknown, used or expired")

    # VERIFY ISSUER: each card accepts the issuer's signature with its own device
    # authentication key, and refuses one made with another card's.
    assert verify_issuer(cards[first], first, stub) == SW.OK
    assert verify_issuer(cards[second], second, stub) == SW.OK
    assert verify_issuer(cards[first], first, stub, signer=second) != SW.OK

    # Clear refusals.
    for call, code, text in [
        (lambda: stub.BeginCardAuthentication(pb.BeginCardAuthenticationRequest(
            serial="ACME-NONE-001"), timeout=30),
         grpc.StatusCode.NOT_FOUND, "no card ACME-NONE-001 in the issuer's stock"),
        (lambda: stub.AuthenticateToCard(pb.AuthenticateToCardRequest(
            serial=stock_only, challenge=bytes(16)), timeout=30),
         grpc.StatusCode.FAILED_PRECONDITION, "never issued by this issuer"),
        (lambda: stub.AuthenticateToCard(pb.AuthenticateToCardRequest(
            serial=first, challenge=bytes(8)), timeout=30),
         grpc.StatusCode.INVALID_ARGUMENT, "challenge: 16 to 64 bytes, not 8"),
        (lambda: stub.VerifyCardAuthentication(pb.VerifyCardAuthenticationRequest(
            serial=first, challenge_id="00", signature=b""), timeout=30),
         grpc.StatusCode.INVALID_ARGUMENT, "signature: 1 to 80 bytes"),
    ]:
        refused(call, code, text)
    refused(lambda: issuance_pb2_grpc.IssuanceStub(load_endpoints(issuer.endpoints).channel(
        "access_server", "card-agent")).AuthenticateToCard(pb.AuthenticateToCardRequest(
            serial=first, challenge=bytes(16)), timeout=30),
        grpc.StatusCode.PERMISSION_DENIED, "")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_a_challenge_expires_and_serves_once() -> None:
    clock = Clock()
    challenges = Challenges(clock, ttl=timedelta(minutes=2), limit=2)
    first, made = challenges.issue("ACME-M-001")
    assert challenges.take(first, "ACME-M-001") == made.challenge
    with pytest.raises(FailedPrecondition, match="unknown, used or expired"):
        challenges.take(first, "ACME-M-001")
    late, _ = challenges.issue("ACME-M-001")
    clock.now += timedelta(minutes=2)
    with pytest.raises(FailedPrecondition, match="unknown, used or expired"):
        challenges.take(late, "ACME-M-001")


def test_open_challenges_are_bounded_and_expired_ones_make_room() -> None:
    clock = Clock()
    challenges = Challenges(clock, ttl=timedelta(minutes=2), limit=2)
    challenges.issue("ACME-M-001")
    challenges.issue("ACME-M-002")
    with pytest.raises(ResourceExhausted):
        challenges.issue("ACME-M-003")
    clock.now += timedelta(minutes=3)
    fresh, made = challenges.issue("ACME-M-003")
    assert challenges.take(fresh, "ACME-M-003") == made.challenge
