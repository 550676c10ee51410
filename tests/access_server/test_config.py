"""The access server's configuration: the card channel's timeouts and stream limits and the
server's keepalive settings are checked at start-up, and a bad value is named with its path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from access_server.config import load_config
from access_server.stream_limits import StreamLimits
from cms.runtime.config import ConfigError
from cms.runtime.server import Keepalive


def _write(tmp_path: Path, server: dict | None = None, card_channel: dict | None = None) -> Path:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("not read here\n")
    path = tmp_path / "access-server.yaml"
    path.write_text(yaml.safe_dump({
        "server": server or {},
        "tls": {"ca": "ca.pem", "cert": "cert.pem", "key": "key.pem"},
        "database": {"url": "sqlite:///access.db"},
        "card_channel": card_channel or {},
    }))
    return path


def test_the_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path))
    assert cfg.hello_timeout_seconds == 10.0
    assert cfg.answer_timeout_seconds == 60.0
    assert cfg.stream_limits == StreamLimits(max_streams=2000, max_streams_per_identity=2000,
                                             max_streams_per_peer=200)
    assert cfg.flow_workers == 32
    assert cfg.keepalive == Keepalive(time_s=60.0, timeout_s=20.0, min_ping_interval_s=10.0,
                                      max_connection_idle_s=300.0)


def test_values_given_are_used(tmp_path: Path) -> None:
    cfg = load_config(_write(
        tmp_path,
        server={"keepalive_time_seconds": 30, "keepalive_timeout_seconds": 5,
                "min_ping_interval_seconds": 2.5, "max_connection_idle_seconds": 60},
        card_channel={"hello_timeout_seconds": 2, "answer_timeout_seconds": 30,
                      "max_streams": 50, "max_streams_per_identity": 40,
                      "max_streams_per_peer": 10, "flow_workers": 4}))
    assert (cfg.hello_timeout_seconds, cfg.answer_timeout_seconds) == (2.0, 30.0)
    assert cfg.stream_limits == StreamLimits(50, 40, 10)
    assert cfg.flow_workers == 4
    assert cfg.keepalive == Keepalive(30.0, 5.0, 2.5, 60.0)


def test_smaller_max_streams_lowers_the_default_per_client_limits(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, card_channel={"max_streams": 50}))
    assert cfg.stream_limits == StreamLimits(50, 50, 50)


@pytest.mark.parametrize("section, values, message", [
    ("card_channel", {"hello_timeout_seconds": 0},
     "card_channel.hello_timeout_seconds: must be positive and at most 3600 seconds, got 0"),
    ("card_channel", {"hello_timeout_seconds": -1}, "hello_timeout_seconds: must be positive"),
    ("card_channel", {"hello_timeout_seconds": 7200},
     "hello_timeout_seconds: must be positive and at most 3600 seconds, got 7200"),
    ("card_channel", {"hello_timeout_seconds": "soon"},
     "card_channel.hello_timeout_seconds: expected float, got str"),
    ("card_channel", {"answer_timeout_seconds": 0}, "answer_timeout_seconds: must be positive"),
    ("card_channel", {"answer_timeout_seconds": 120, "lease_seconds": 120},
     "card_channel.answer_timeout_seconds: must be less than lease_seconds (120)"),
    ("card_channel", {"max_streams": 0}, "card_channel.max_streams: must be at least 1"),
    ("card_channel", {"max_streams": 1_000_000},
     "card_channel.max_streams: must be at most 100000"),
    ("card_channel", {"max_streams": 100, "max_streams_per_peer": 101},
     "card_channel.max_streams_per_peer: must be at most max_streams (100)"),
    ("card_channel", {"max_streams_per_identity": 2001},
     "card_channel.max_streams_per_identity: must be at most max_streams (2000)"),
    ("card_channel", {"max_streams_per_peer": 0},
     "card_channel.max_streams_per_peer: must be at least 1"),
    ("card_channel", {"max_streams_per_peer": True},
     "card_channel.max_streams_per_peer: expected int, got bool"),
    ("card_channel", {"flow_workers": 0}, "card_channel.flow_workers: must be at least 1"),
    ("server", {"keepalive_time_seconds": 0},
     "server.keepalive_time_seconds: must be positive, got 0"),
    ("server", {"keepalive_timeout_seconds": 60},
     "server.keepalive_timeout_seconds: must be less than keepalive_time_seconds (60)"),
    ("server", {"max_connection_idle_seconds": -5},
     "server.max_connection_idle_seconds: must be positive, got -5"),
    ("server", {"min_ping_interval_seconds": 30},
     "server.min_ping_interval_seconds: must be at most 20: card agents ping every 20 s"),
])
def test_a_bad_value_is_named(tmp_path: Path, section: str, values: dict, message: str) -> None:
    path = _write(tmp_path, **{section: values})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_the_server_refuses_a_bad_configuration_with_one_line(tmp_path: Path) -> None:
    """As an operator starts it: a message naming the value and a non-zero exit."""
    import subprocess
    import sys

    path = _write(tmp_path, card_channel={"hello_timeout_seconds": 0})
    done = subprocess.run([sys.executable, "-m", "cms.cli", "access-server", "serve",
                           "--config", str(path)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode != 0
    assert "card_channel.hello_timeout_seconds: must be positive" in done.stderr
    assert "Traceback" not in done.stderr


def test_security_level_settings(tmp_path: Path) -> None:
    from access_server.levels import LevelPolicy

    assert load_config(_write(tmp_path)).levels == LevelPolicy(minimum=0x03, cap=None)
    cfg = load_config(_write(tmp_path, card_channel={"minimum_security_level": "13",
                                                     "security_level": "0x33"}))
    assert cfg.levels == LevelPolicy(minimum=0x13, cap=0x33)
    # YAML reads 0x11 as the number 17: that is level 11 too.
    path = tmp_path / "hex.yaml"
    path.write_text(_write(tmp_path).read_text().replace(
        "card_channel: {}", "card_channel: {minimum_security_level: 0x11}"))
    assert load_config(path).levels.minimum == 0x11


@pytest.mark.parametrize("values, message", [
    ({"minimum_security_level": 13},
     "minimum_security_level: 13 is not an SCP03 security level: one of 01, 03, 11, 13, 33 "
     "(YAML read a decimal number: write the level in quotes, e.g. '13')"),
    ({"minimum_security_level": "ab"}, "minimum_security_level: 'ab' is not an SCP03"),
    ({"minimum_security_level": "high"}, "'high' is not a security level in hex"),
    ({"minimum_security_level": "00"},
     "minimum_security_level: the minimum must include C-MAC (at least 01)"),
    ({"minimum_security_level": True}, "minimum_security_level: a security level in hex"),
    ({"security_level": "best"}, "security_level: 'best' is not a security level in hex"),
    ({"minimum_security_level": "03", "security_level": "11"},
     "security_level: security level 11 (C-MAC, R-MAC) lacks a protection of the minimum "
     "03 (C-MAC, C-DECRYPTION)"),
])
def test_a_bad_security_level_setting_is_named(tmp_path: Path, values: dict,
                                               message: str) -> None:
    path = _write(tmp_path, card_channel=values)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("scp_i, cap, chosen", [
    (0x10, None, 0x03), (0x30, None, 0x13), (0x70, None, 0x33), (0x60, None, 0x33),
    (0x50, None, 0x03), (0x70, 0x13, 0x13), (0x10, 0x13, 0x03), (0x70, 0x03, 0x03),
])
def test_the_highest_level_the_card_offers_within_the_choice(scp_i: int, cap: int | None,
                                                              chosen: int) -> None:
    from access_server.levels import LevelPolicy

    assert LevelPolicy(minimum=0x03, cap=cap).choose(scp_i) == chosen


def test_the_minimum_is_a_set_of_protections() -> None:
    from access_server.levels import LevelPolicy

    policy = LevelPolicy(minimum=0x11)
    assert policy.acceptable(0x13) and policy.acceptable(0x33) and policy.acceptable(0x11)
    assert not policy.acceptable(0x03)          # C-DECRYPTION, but no R-MAC
    assert not LevelPolicy(minimum=0x13).acceptable(policy.choose(0x10))
