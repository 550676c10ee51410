"""Flow A with the registry in PostgreSQL: a second access server process, configured with
a PostgreSQL URL (a real server started by the tests), beside the launcher's proxy."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import yaml

from card_agent.session import AgentInfo
from cardcore.diversify import diversify_key_set_software
from cardcore.psd import psd_id_bytes
from cms.runtime.client import load_endpoints
from cms.v1 import access_pb2 as apb
from cms.v1 import access_pb2_grpc
from cms.v1 import card_channel_pb2 as pb
from tests.support.card_keys import provision
from tests.support.contacts import contact
from tests.support.launcher import dev_stack
from virtual_psd.factory import create_card
from virtual_psd.isd import isd_state
from virtual_psd.state import load_state

pytest_plugins = ("tests.support.postgres",)
pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.timeout(300)]

MASTER = bytes.fromhex("1234567890ABCDEF1234567890ABCDEF")


def _serve(stack: Path, url: str, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    base = json.loads(stack.read_text())
    directory = stack.parent
    config = {
        "server": {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"},
        "tls": {"ca": base["tls"]["ca"], **{k: base["tls"]["identities"]["access-server"][k]
                                             for k in ("cert", "key")}},
        "database": {"url": url},
        "proxy": {"address": base["services"]["hsm_proxy"]["grpc"]},
        "key_mgmt": {"address": base["services"]["key_mgmt"]["grpc"]},
    }
    path = tmp_path / "access-pg.yaml"
    path.write_text(yaml.safe_dump(config))
    ready = tmp_path / "ready.json"
    log = open(tmp_path / "access-pg.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cms.cli", "access-server", "serve",
                             "--config", str(path), "--ready-file", str(ready)],
                            stdout=log, stderr=log, cwd=directory)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, (tmp_path / "access-pg.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    endpoints = dict(base)
    endpoints["services"] = {**base["services"],
                             "access_server": json.loads(ready.read_text())}
    out = tmp_path / "endpoints-pg.json"
    out.write_text(json.dumps(endpoints))
    return proc, out


def _session(endpoints: Path, card: Path, role: int):
    return contact(endpoints, card, AgentInfo(role=role, label="pg"))


def test_a1_and_a2_with_postgresql(postgres_url: str, tmp_path: Path) -> None:
    with dev_stack(tmp_path / "stack") as stack:
        provision(stack, MASTER)
        proc, endpoints = _serve(stack, postgres_url, tmp_path)
        try:
            card = tmp_path / "card.json"
            psd_id = create_card(card, transport_master=MASTER).psd_id
            channel = load_endpoints(endpoints).channel("access_server", "admin")
            registry = access_pb2_grpc.PsdRegistryStub(channel)
            campaigns = access_pb2_grpc.CampaignsStub(channel)
            registry.RegisterPsds(apb.RegisterPsdsRequest(psd_ids=[psd_id]), timeout=30)
            assert _session(endpoints, card, pb.PERSONALIZATION_STATION).done.outcome == \
                pb.SessionDone.OK
            campaigns.StartCampaign(apb.StartCampaignRequest(
                from_mk_version=2, to_mk_version=1,
                filter=apb.CampaignFilter(psd_ids=[psd_id])), timeout=30)
            assert _session(endpoints, card, pb.USER_PC).done.outcome == pb.SessionDone.OK
            assert set(isd_state(load_state(card)).key_sets) == {0x70, 0x01}
            psd = registry.GetPsd(apb.GetPsdRequest(psd_id=psd_id), timeout=30)
            assert psd.state == apb.PSD_ACTIVE and psd.mk_version == 1
            channel.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    # Nothing secret in the database: every value of every table, as text and bytes.
    transport = diversify_key_set_software(MASTER, psd_id_bytes(psd_id), 16)
    secrets = [MASTER, *transport.keys()]
    with psycopg.connect(postgres_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        tables = [r[0] for r in conn.execute(
            "select tablename from pg_tables where schemaname = 'public'")]
        assert tables
        dump = b""
        for table in tables:
            for row in conn.execute(f'select * from "{table}"'):  # noqa: S608 - names from pg
                dump += repr(row).encode() + b"".join(
                    bytes(v) for v in row if isinstance(v, (bytes, memoryview)))
    assert psd_id.encode() in dump                     # the scan reads the data
    for secret in secrets:
        assert secret not in dump and secret.hex().encode() not in dump
        assert secret.hex().upper().encode() not in dump
