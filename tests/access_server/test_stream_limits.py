"""Counting the card channel's open streams against its three limits (no I/O)."""

from __future__ import annotations

import pytest

from access_server.stream_limits import Admission, StreamLimits, peer_host


@pytest.mark.parametrize("peer, host", [
    ("ipv4:10.0.0.7:51234", "10.0.0.7"),
    ("ipv6:[::1]:51234", "::1"),
    ("ipv6:%5B2001:db8::5%5D:443", "2001:db8::5"),
    ("unix:/run/cms.sock", "unix:/run/cms.sock"),
])
def test_peer_host(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_each_peer_host_has_its_own_allowance_and_gets_it_back() -> None:
    admission = Admission(StreamLimits(max_streams=10, max_streams_per_identity=10,
                                       max_streams_per_peer=2))
    assert admission.admit("card-agent", "10.0.0.1") is None
    assert admission.admit("card-agent", "10.0.0.1") is None
    refusal = admission.admit("card-agent", "10.0.0.1")
    assert refusal == ("10.0.0.1 has 2 card channels open, its limit "
                       "(card_channel.max_streams_per_peer); try again later")
    assert admission.admit("card-agent", "10.0.0.2") is None      # another PC
    admission.release("card-agent", "10.0.0.1")
    assert admission.admit("card-agent", "10.0.0.1") is None
    assert admission.open_streams == 3


def test_the_identity_limit_counts_across_hosts() -> None:
    admission = Admission(StreamLimits(max_streams=10, max_streams_per_identity=2,
                                       max_streams_per_peer=10))
    assert admission.admit("card-agent", "10.0.0.1") is None
    assert admission.admit("card-agent", "10.0.0.2") is None
    refusal = admission.admit("card-agent", "10.0.0.3")
    assert refusal is not None and "identity card-agent has 2" in refusal
    assert "card_channel.max_streams_per_identity" in refusal
    # Agents without a certificate count as one identity of their own.
    assert admission.admit(None, "10.0.0.3") is None


def test_the_total_limit_comes_first_and_releases_are_counted() -> None:
    admission = Admission(StreamLimits(max_streams=3, max_streams_per_identity=3,
                                       max_streams_per_peer=3))
    for host in ("a", "b", "c"):
        assert admission.admit("card-agent", host) is None
    refusal = admission.admit("card-agent", "d")
    assert refusal == ("the access server has 3 card channels open, its limit "
                       "(card_channel.max_streams); try again later")
    for host in ("a", "b", "c"):
        admission.release("card-agent", host)
    assert admission.open_streams == 0
    assert admission.admit("card-agent", "d") is None
