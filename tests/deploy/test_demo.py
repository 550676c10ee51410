"""The README's demo (`cms demo`, run by scripts/demo) end to end in a scratch directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.launcher import cms

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_demo_signs_in_the_hsm_verifies_outside_and_stops_its_stack(tmp_path: Path) -> None:
    done = cms("demo", "--dir", str(tmp_path))
    out = done.stdout
    assert "cms.v1.Hsm is SERVING" in out
    assert "sensitive=True extractable=False" in out
    assert "verified by the proxy: True" in out
    assert "verified outside the HSM with the exported public key: True" in out
    assert 'cms_grpc_server_handled_total{code="OK",method="Sign"' in out
    assert "stopped " in out and "hsm_proxy" in out.split("stopped ")[-1]
    assert "Traceback" not in done.stderr
    # The PINs of the tokens it created reach neither its output nor the logs.
    pins = [p.read_text().strip() for p in (tmp_path / "softhsm" / "secrets").glob("*pin")]
    assert len(pins) == 4 and all(pins)
    logs = [f.read_text(errors="replace") for f in (tmp_path / "logs").rglob("*") if f.is_file()]
    assert logs
    for pin in pins:
        assert pin not in out and pin not in done.stderr
        assert not any(pin in text for text in logs)
