"""The mailing house's tests stand in the bureau's world (``tests/bureau/conftest.py``)."""

from tests.bureau.conftest import perso, templates, world  # noqa: F401
