"""Restart one service of a running local stack with some of its configuration changed.

`cms dev up` writes each service's configuration with the embedded defaults;
a test that needs other values (a short timeout, a low limit) restarts the
service through the launcher's own functions with those sections updated.
The service comes back on the same port (the launcher keeps its ports), so
endpoints.json stays right.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


def restart_with(directory: Path, service: str, overrides: dict[str, dict[str, Any]]) -> None:
    """Stop ``service`` of the stack in ``directory`` and start it with each section of
    ``overrides`` merged into its configuration; returns once it is SERVING."""
    from deploy import local

    stack = local.Stack(directory)
    stack.ports.update(local.running_services(stack))
    spec = next(s for s in local.SERVICES if s.name == service)

    def write_config(running: local.Stack) -> dict:
        config = spec.write_config(running)
        for section, values in overrides.items():
            config.setdefault(section, {}).update(values)
        return config

    local.stop_service(stack, service)
    local.start_service(stack, dataclasses.replace(spec, write_config=write_config))
