"""SoftHSM2 tokens for the embedded default and tests.

A SoftHSM2 "HSM" is a directory of token files plus a config file that points
at it (``SOFTHSM2_CONF``). Tokens are created with random user and SO PINs,
stored in files readable only by the owner; nothing here prints a PIN.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
P11KIT_CLIENT_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib/pkcs11/p11-kit-client.so",
)


class SoftHsmError(Exception):
    """SoftHSM2 is missing or a token cannot be created."""


def find_module() -> str:
    for candidate in DEFAULT_MODULE_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    raise SoftHsmError("SoftHSM2 is not installed (libsofthsm2.so not found); "
                       "install the Debian package softhsm2")


def find_p11kit_client() -> str:
    for candidate in P11KIT_CLIENT_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    raise SoftHsmError("p11-kit-client.so not found; install the Debian package p11-kit-modules")


@dataclass(frozen=True)
class SoftHsm:
    """One SoftHSM2 installation rooted at ``directory``."""

    directory: Path

    @property
    def conf(self) -> Path:
        return self.directory / "softhsm2.conf"

    @property
    def tokens_dir(self) -> Path:
        return self.directory / "tokens"

    @property
    def secrets_dir(self) -> Path:
        return self.directory / "secrets"

    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    def pin_file(self, label: str) -> Path:
        return self.secrets_dir / f"{label}.pin"

    def so_pin_file(self, label: str) -> Path:
        """The token's security officer PIN (the proxy's officer worker sets CKA_TRUSTED)."""
        return self.secrets_dir / f"{label}.so-pin"

    def ensure(self) -> SoftHsm:
        self.tokens_dir.mkdir(parents=True, exist_ok=True)
        self.secrets_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.secrets_dir, 0o700)
        if not self.conf.exists():
            self.conf.write_text(
                f"directories.tokendir = {self.tokens_dir}\n"
                "objectstore.backend = file\n"
                "log.level = ERROR\n"
                "slots.removable = false\n"
            )
        return self

    def token_labels(self) -> list[str]:
        util = shutil.which("softhsm2-util")
        if util is None:
            raise SoftHsmError("softhsm2-util not found; install the Debian package softhsm2")
        out = subprocess.run([util, "--show-slots"], env={**os.environ, **self.env()},
                             capture_output=True, text=True, check=False).stdout
        labels = []
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("Label:"):
                label = line.split(":", 1)[1].strip()
                if label:
                    labels.append(label)
        return labels

    def init_token(self, label: str) -> Path:
        """Create token ``label`` unless it exists; returns its user PIN file."""
        self.ensure()
        pin_file = self.pin_file(label)
        if label in self.token_labels():
            if not pin_file.exists():
                raise SoftHsmError(f"token {label!r} exists but its PIN file {pin_file} is missing")
            return pin_file
        user_pin = secrets.token_hex(12)
        so_pin = secrets.token_hex(12)
        for path, value in ((pin_file, user_pin), (self.so_pin_file(label), so_pin)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(value + "\n")
        # PINs go through the environment-free argv of a short-lived child; they
        # are random per installation and stored only in the 0600 files above.
        result = subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label,
             "--pin", user_pin, "--so-pin", so_pin],
            env={**os.environ, **self.env()}, capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise SoftHsmError(f"softhsm2-util could not create token {label!r}: "
                               f"{result.stderr.strip() or result.stdout.strip()}")
        return pin_file
