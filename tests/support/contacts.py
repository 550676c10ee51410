"""One card contact from a test: the card agent's session code over an in-process card."""

from __future__ import annotations

from pathlib import Path

from card_agent.session import AgentInfo, SessionReport, StepsHook, run_session
from cms.runtime.client import load_endpoints
from virtual_psd.agent_source import VirtualTransport
from virtual_psd.card import VirtualCard
from virtual_psd.faults import FaultPlan


def contact(endpoints_path: Path, card_path: Path, info: AgentInfo,
            identity: str = "card-agent", on_steps: StepsHook | None = None,
            faults: FaultPlan | None = None) -> SessionReport:
    """Run one CardChannel session for the virtual card stored at ``card_path``.

    ``faults`` numbers this contact's APDUs from 1 (a new card object per contact).
    """
    channel = load_endpoints(endpoints_path).channel("access_server", identity)
    transport = VirtualTransport(VirtualCard.open(card_path, faults=faults))
    try:
        return run_session(transport, channel, info, deadline_s=60, on_steps=on_steps)
    finally:
        transport.close()
        channel.close()
