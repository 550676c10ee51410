"""The error a command handler raises to end with one line and an exit status.

It sits in the runtime, below every package's ``cli`` module, so that a
service's commands need nothing from the ``cms`` command that registers them:
the registrar imports the services' modules, never the reverse.
"""

from __future__ import annotations


class CliError(Exception):
    """An error a command reports as one line, exiting with ``status``."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status
