"""The local launcher: the whole system on one machine (the embedded default).

``cms dev up --dir DIR`` creates on first use the SoftHSM2 tokens (``access``
for HSM1, ``kms`` for HSM2, ``provider`` for the card provider's root CA and
``issuer`` for the issuer keys and seed, ``issuer-system`` for the device
authentication KEK, ``bureau`` and ``mailer`` for the issuer's partners' keys),
the development PKI, configuration and policy;
starts each service in the background on free loopback ports (each binds port
0 and reports the port it got in a ready file, so nothing races for ports);
waits until the standard health check says SERVING; and writes
``DIR/endpoints.json``. ``cms dev down --dir DIR`` stops what ``up`` started.
A second ``up`` reuses the tokens, keys and certificates.

Layout of DIR::

    pki/            CA and one certificate per identity
    softhsm/        softhsm2.conf, tokens/, secrets/ (PIN files, 0600)
    config/         one YAML per service, policy.yaml
    run/            <service>.ready and <service>.pid, ports.json
    logs/           <service>.log (JSON lines)
    audit/          the proxy's hash-chained audit log
    data/           databases (SQLite)
    endpoints.json  where everything is, for clients and tests

``config/``, ``run/``, ``logs/``, ``audit/`` and ``data/`` are the owner's
only (directories 0700, files 0600, and ``endpoints.json`` 0600), whatever
the umask of whoever runs ``up``: the launcher writes its files so, starts
the services with umask 077 for what they create themselves, and tightens
what an earlier run left wider.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cms import keynames as kn
from cms.identity import ACCESS_SERVER, HSM_PROXY, KEY_MGMT
from cms.runtime.config import ConfigError
from cms.runtime.files import (
    PRIVATE_UMASK,
    make_dirs,
    open_private_append,
    private_dir,
    tighten_tree,
    write_private,
)
from cms.runtime.tls import TlsFiles, secure_channel
from deploy.pki import CUSTODIANS, DEFAULT_IDENTITIES, Pki, init_pki
from deploy.softhsm import SoftHsm, find_module

TOKENS = kn.TOKENS
PRIVATE_DIRS = ("config", "run", "logs", "audit", "data")
"""The stack's directories of configuration, run state, logs, audit and databases."""
READY_TIMEOUT_S = 60.0
POLICY_MARK = ("# Written by 'cms dev up' and rewritten by each 'up'; delete this line to keep "
               "your edits.\n")
STOP_TIMEOUT_S = 15.0


class LauncherError(ConfigError):
    """A service that did not start or stop as it should."""


@dataclass(frozen=True)
class ServiceSpec:
    """How to configure and start one service."""

    name: str                      # key in endpoints.json, e.g. "hsm_proxy"
    identity: str                  # its certificate identity
    command: tuple[str, ...]       # cms subcommand, e.g. ("hsm-proxy", "serve")
    health_service: str            # gRPC service whose health gates readiness
    write_config: Callable[[Stack], dict]
    depends: tuple[str, ...] = ()
    module: str = ""               # importable module proving the service exists


@dataclass
class Stack:
    """One local deployment rooted at ``directory``."""

    directory: Path
    ports: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.directory = self.directory.resolve()

    # -- paths --------------------------------------------------------------
    @property
    def pki_dir(self) -> Path:
        return self.directory / "pki"

    @property
    def hsm(self) -> SoftHsm:
        return SoftHsm(self.directory / "softhsm")

    def path(self, *parts: str) -> Path:
        p = self.directory.joinpath(*parts)
        make_dirs(p.parent)                     # any directory it creates is 0700
        return p

    def config_path(self, name: str) -> Path:
        return self.path("config", f"{name}.yaml")

    def ready_path(self, name: str) -> Path:
        return self.path("run", f"{name}.ready")

    def pid_path(self, name: str) -> Path:
        return self.path("run", f"{name}.pid")

    def log_path(self, name: str) -> Path:
        return self.path("logs", f"{name}.log")

    @property
    def endpoints_path(self) -> Path:
        return self.directory / "endpoints.json"

    # -- preparation ----------------------------------------------------------
    def prepare(self) -> Pki:
        """Create PKI, tokens and policy on first use; keep them afterwards."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for name in PRIVATE_DIRS:
            # Made owner-only, and what an earlier run left wider is tightened.
            private_dir(self.directory / name)
            tighten_tree(self.directory / name)
        if self.endpoints_path.exists():
            os.chmod(self.endpoints_path, 0o600)
        pki = init_pki(self.pki_dir, DEFAULT_IDENTITIES)
        hsm = self.hsm.ensure()
        for label in TOKENS:
            hsm.init_token(label)
        policy = self.config_path("policy")
        if not policy.exists() or policy.read_text().startswith(POLICY_MARK):
            # The launcher's own policy follows the release; one an operator
            # edited (the first line removed) is left alone.
            write_private(policy, POLICY_MARK + yaml.safe_dump(default_policy(),
                                                               sort_keys=False))
        return pki

    def tls(self, identity: str) -> dict[str, str]:
        pki = self.pki_dir
        return {"ca": str(pki / "ca.pem"), "cert": str(pki / f"{identity}.pem"),
                "key": str(pki / f"{identity}.key")}

    def tls_files(self, identity: str) -> TlsFiles:
        t = self.tls(identity)
        return TlsFiles(Path(t["ca"]), Path(t["cert"]), Path(t["key"]))

    # Ports are chosen by the kernel on a service's first start and kept in
    # run/ports.json, so a restarted service comes back where its clients
    # (and other services' configuration) expect it.
    @property
    def ports_file(self) -> Path:
        return self.path("run", "ports.json")

    def _saved_ports(self) -> dict[str, dict[str, int]]:
        try:
            return json.loads(self.ports_file.read_text())
        except (OSError, ValueError):
            return {}

    def listen(self, service: str, kind: str = "grpc") -> str:
        port = self._saved_ports().get(service, {}).get(kind, 0)
        return f"127.0.0.1:{port}"

    def save_ports(self, service: str, grpc_address: str, metrics_url: str | None) -> None:
        saved = self._saved_ports()
        entry = {"grpc": int(grpc_address.rsplit(":", 1)[1])}
        if metrics_url:
            entry["metrics"] = int(metrics_url.rsplit(":", 1)[1].split("/", 1)[0])
        saved[service] = entry
        write_private(self.ports_file, json.dumps(saved, indent=2))

    def address(self, service: str) -> str:
        try:
            return self.ports[service]["grpc"]
        except KeyError:
            raise LauncherError(f"{service} is not running") from None


# ---------------------------------------------------------------------------
# Policy and configuration of each service

CARD_CHANNEL_OPERATIONS = ["DeriveKeySet", "OpenSecureChannel", "OpenSecureChannelBatch",
                           "WrapCommands", "UnwrapResponses"]
OPERATOR_KEY_OPERATIONS = ["GenerateSecretKey", "GenerateKeyPair", "DeriveKey", "DeriveKeyBatch",
                           "ImportPublicKey", "Encrypt", "Decrypt", "EncryptBatch", "Sign",
                           "SignBatch", "Verify", "DestroyKey"]
INSPECT_OPERATIONS = ["ListTokens", "ListKeys", "GetKeyAttributes", "GetPublicKey",
                      "GenerateRandom", "ListBlocks", "GetCeremony"]
PROVIDER_CA_OPERATIONS = ["CreateRoot", "GetRoot", "IssueCardCertificates", "SignPack"]
BUREAU_HSM_OPERATIONS = ["CreateBureauKey", "GetBureauCertificate", "SignBureauFile",
                         "SealCardCodes"]
MAILER_HSM_OPERATIONS = ["CreateMailerKey", "GetMailerKey", "OpenMailerData", "SignMailerFile"]
ISSUER_HSM_OPERATIONS = ["IssueBatch", "GenerateDeviceAuthKeys", "SignWithDeviceAuthKey",
                         "SignIssuerFile"]


def default_policy() -> dict:
    """Least privilege for the embedded default: each identity gets its purposes.

    No service identity has a wildcard operation or the generic Hsm service:
    the access server opens card channels in HSM1 with the masters key
    management put there; key management generates blocks in HSM2, moves
    them to HSM1 under transport keys and begins ceremonies, whose components
    only custodians enter; the operator (admin) inspects everything, uses
    only its own demo keys, makes the issuer keys, the issuer's seed and
    the device authentication KEK and reads the provider's root certificate;
    the access server issues (payloads, device authentication keys, the
    issuer's files); the bureau signs its files and the mailing house opens
    mailer data, each with its own key alone; the provider signs with its root only what ProviderCa
    builds and opens cards' transport channels with the factory master
    alone. The key classes bound what each purpose can do whatever this file
    says (docs/threat-model.md).
    """
    blocks = [kn.label_pattern(kind) for kind in kn.BLOCK_KINDS]
    masters = [*blocks, kn.FACTORY_TRANSPORT_MASTER]
    transport_keys = kn.label_pattern(kn.TRANSPORT)
    ceremony_keys = [transport_keys, kn.FACTORY_TRANSPORT_MASTER]
    both = [kn.HSM2_TOKEN, kn.HSM1_TOKEN]
    roots = kn.label_pattern(kn.PROVIDER_ROOT)
    issuer_keys = kn.label_pattern(kn.ISSUER)
    seeds = kn.label_pattern(kn.ISSUER_SEED)
    keks = kn.label_pattern(kn.DEVICE_AUTH_KEK)
    bureau_keys = kn.label_pattern(kn.BUREAU)
    codes_keys = kn.label_pattern(kn.BUREAU_CODES)
    mailer_keys = kn.label_pattern(kn.MAILER)
    mailer_signing_keys = kn.label_pattern(kn.MAILER_SIGN)
    identities: dict[str, list[dict]] = {
        "access-server": [
            {"operations": [*CARD_CHANNEL_OPERATIONS, "ListBlocks"], "tokens": [kn.HSM1_TOKEN],
             "keys": masters},
            {"operations": ["GetIssuerKey"], "tokens": [kn.ISSUER_TOKEN], "keys": [issuer_keys]},
            # Issuance (seed 004, B3): payloads from the seed and the issuer key, the
            # issuer's files, the cards' device authentication keys.
            {"operations": ISSUER_HSM_OPERATIONS, "tokens": [kn.ISSUER_TOKEN],
             "keys": [issuer_keys, seeds]},
            {"operations": ISSUER_HSM_OPERATIONS, "tokens": [kn.ISSUER_SYSTEM_TOKEN],
             "keys": [keks]},
        ],
        "key-mgmt": [
            {"operations": ["GenerateBlock"], "tokens": [kn.HSM2_TOKEN], "keys": blocks},
            {"operations": ["ListBlocks"], "tokens": both,
             "keys": [*blocks, *ceremony_keys]},
            {"operations": ["TransferBlocks"], "tokens": both,
             "keys": [*blocks, transport_keys]},
            {"operations": ["EstablishTransportKey"], "tokens": both,
             "keys": [transport_keys]},
            {"operations": ["BeginCeremony", "GetCeremony", "CancelCeremony"], "tokens": both,
             "keys": ceremony_keys},
        ],
        "admin": [
            {"operations": INSPECT_OPERATIONS, "tokens": ["*"], "keys": ["*"]},
            {"operations": OPERATOR_KEY_OPERATIONS, "tokens": ["*"],
             "keys": [f"{kn.OPERATOR_PREFIX}*"]},
            {"operations": ["CreateIssuerKey", "GetIssuerKey"], "tokens": [kn.ISSUER_TOKEN],
             "keys": [issuer_keys]},
            {"operations": ["CreateSeed"], "tokens": [kn.ISSUER_TOKEN], "keys": [seeds]},
            {"operations": ["CreateDeviceAuthKek"], "tokens": [kn.ISSUER_SYSTEM_TOKEN],
             "keys": [keks]},
            {"operations": ["GetRoot"], "tokens": [kn.PROVIDER_TOKEN], "keys": [roots]},
            # The partners' public halves, to trust a bureau and encrypt to a mailer.
            {"operations": ["GetBureauCertificate"], "tokens": [kn.BUREAU_TOKEN],
             "keys": [bureau_keys]},
            {"operations": ["GetMailerKey"], "tokens": [kn.MAILER_TOKEN],
             "keys": [mailer_keys, mailer_signing_keys]},
        ],
        # The bureau signs its results and shipping files; the mailing house opens the
        # mailer data of PIN letters. Each only in its own token.
        "bureau": [{"operations": BUREAU_HSM_OPERATIONS, "tokens": [kn.BUREAU_TOKEN],
                    "keys": [bureau_keys, codes_keys]}],
        "mailer": [{"operations": MAILER_HSM_OPERATIONS, "tokens": [kn.MAILER_TOKEN],
                    "keys": [mailer_keys, mailer_signing_keys]}],
        "provider": [
            {"operations": PROVIDER_CA_OPERATIONS, "tokens": [kn.PROVIDER_TOKEN],
             "keys": [roots]},
            # A card's transport channel (keys diversified from the factory master),
            # to run the issuance applet's initialization in it; no other master.
            {"operations": CARD_CHANNEL_OPERATIONS, "tokens": [kn.HSM1_TOKEN],
             "keys": [kn.FACTORY_TRANSPORT_MASTER]},
        ],
    }
    for custodian in CUSTODIANS:
        identities[custodian] = [
            {"operations": ["AddComponent", "GetCeremony"], "tokens": both,
             "keys": ceremony_keys},
        ]
    return {"identities": identities}


def hsm_proxy_config(stack: Stack) -> dict:
    hsm = stack.hsm
    return {
        "server": {"listen": stack.listen("hsm_proxy"),
                   "metrics_listen": stack.listen("hsm_proxy", "metrics")},
        "tls": stack.tls(HSM_PROXY),
        "pkcs11": {
            "module": find_module(),
            "env": hsm.env(),
            "workers": max(2, min(4, os.cpu_count() or 2)),
            # The SO PIN only where the trusted halves of transport keys are made.
            "tokens": [{"label": t, "pin_file": str(hsm.pin_file(t)),
                        **({"so_pin_file": str(hsm.so_pin_file(t))} if t == kn.HSM2_TOKEN
                           else {})} for t in TOKENS],
        },
        "policy": str(stack.config_path("policy")),
        "audit": {"file": str(stack.path("audit", "hsm-proxy.jsonl"))},
        "handles": {"ttl_seconds": 300, "max_per_identity": 100000,
                    "ceremony_ttl_seconds": 3600},
        "limits": {"max_batch_items": 4096, "max_data_bytes": 65536},
        "log": {"level": "info", "file": None},
    }


def key_mgmt_config(stack: Stack) -> dict:
    return {
        "server": {"listen": stack.listen("key_mgmt"),
                   "metrics_listen": stack.listen("key_mgmt", "metrics")},
        "tls": stack.tls(KEY_MGMT),
        "database": {"url": f"sqlite:///{stack.path('data', 'key-mgmt.db')}"},
        "proxy": {"address": stack.address("hsm_proxy")},
        "tokens": {"hsm2": kn.HSM2_TOKEN, "hsm1": kn.HSM1_TOKEN},
        "log": {"level": "info", "file": None},
    }


ACCESS_DATABASE_FILE = "access-database.url"
"""Where ``cms dev up --access-database`` leaves the registry's URL (0600: it may hold a
password), so later ``up`` runs and restarts keep using it."""


def access_database_url(stack: Stack) -> str:
    saved = stack.directory / "config" / ACCESS_DATABASE_FILE
    if saved.exists():
        return saved.read_text().strip()
    return f"sqlite:///{stack.path('data', 'access.db')}"


def save_access_database_url(stack: Stack, url: str) -> None:
    if not url.startswith(("sqlite://", "postgresql")):
        raise LauncherError(f"--access-database: expected sqlite:///PATH or "
                            f"postgresql+psycopg://..., got {url.split(':', 1)[0]!r}")
    write_private(stack.path("config", ACCESS_DATABASE_FILE), url + "\n")


def access_server_config(stack: Stack) -> dict:
    return {
        "server": {"listen": stack.listen("access_server"),
                   "metrics_listen": stack.listen("access_server", "metrics")},
        "tls": stack.tls(ACCESS_SERVER),
        "database": {"url": access_database_url(stack)},
        "proxy": {"address": stack.address("hsm_proxy")},
        # Which master versions key management transferred (access_server.masters).
        **({"key_mgmt": {"address": stack.ports["key_mgmt"]["grpc"]}}
           if "key_mgmt" in stack.ports else {}),
        "card_channel": {"allow_agents_without_certificate": False, "lease_seconds": 120},
        "log": {"level": "info", "file": None},
    }


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("hsm_proxy", HSM_PROXY, ("hsm-proxy", "serve"), "cms.v1.Hsm",
                hsm_proxy_config, module="hsm_proxy.server"),
    ServiceSpec("key_mgmt", KEY_MGMT, ("key-mgmt", "serve"), "cms.v1.KeyManagement",
                key_mgmt_config, depends=("hsm_proxy",), module="key_mgmt.server"),
    ServiceSpec("access_server", ACCESS_SERVER, ("access-server", "serve"),
                "cms.v1.PsdRegistry", access_server_config, depends=("hsm_proxy", "key_mgmt"),
                module="access_server.server"),
)


def available_services() -> list[ServiceSpec]:
    """The services whose code is installed (a deployment may lack some)."""
    import importlib.util

    return [s for s in SERVICES if not s.module or importlib.util.find_spec(s.module)]


# ---------------------------------------------------------------------------
# Processes

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still "exists"; reap it if it is one.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def check_health(address: str, tls: TlsFiles, service: str = "", timeout: float = 2.0, *,
                 server_identity: str) -> bool:
    """Whether the server at ``address``, proving ``server_identity``, serves ``service``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = secure_channel(address, tls, server_identity=server_identity)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def start_service(stack: Stack, spec: ServiceSpec, *, extra_env: dict[str, str] | None = None,
                  timeout: float = READY_TIMEOUT_S) -> dict:
    """Start one service in the background and wait until it is SERVING."""
    config = spec.write_config(stack)
    cfg_path = stack.config_path(spec.name)
    write_private(cfg_path, yaml.safe_dump(config, sort_keys=False))
    ready = stack.ready_path(spec.name)
    ready.unlink(missing_ok=True)
    log_file = stack.log_path(spec.name)
    env = {**os.environ, **(extra_env or {})}
    with open_private_append(log_file) as log:
        # umask 077: what the service creates itself (its ready file, the audit
        # log, temporary files) is owner-only as well.
        proc = subprocess.Popen(
            [sys.executable, "-m", "cms.cli", *spec.command, "--config", str(cfg_path),
             "--ready-file", str(ready)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
            start_new_session=True, cwd=stack.directory, umask=PRIVATE_UMASK,
        )
    write_private(stack.pid_path(spec.name), str(proc.pid))
    deadline = time.monotonic() + timeout
    info: dict | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LauncherError(
                f"{spec.name} exited with status {proc.returncode} while starting; "
                f"last lines of {log_file}:\n{_log_tail(log_file)}")
        if info is None and ready.exists():
            try:
                info = json.loads(ready.read_text())
            except ValueError:
                info = None
        if info is not None and check_health(info["grpc"], stack.tls_files("admin"),
                                             spec.health_service,
                                             server_identity=spec.identity):
            entry = {"grpc": info["grpc"], "metrics": info.get("metrics"), "pid": proc.pid}
            stack.ports[spec.name] = entry
            stack.save_ports(spec.name, info["grpc"], info.get("metrics"))
            return entry
        time.sleep(0.1)
    proc.terminate()
    raise LauncherError(f"{spec.name} did not become SERVING within {timeout:.0f}s; "
                        f"see {log_file}:\n{_log_tail(log_file)}")


def stop_service(stack: Stack, name: str, timeout: float = STOP_TIMEOUT_S) -> bool:
    """SIGTERM (graceful), then SIGKILL after ``timeout``. True if it was running."""
    pid_file = stack.pid_path(name)
    pid = _read_pid(pid_file)
    if pid is None or not _pid_alive(pid):
        pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.05)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    stack.ready_path(name).unlink(missing_ok=True)
    return True


def running_services(stack: Stack) -> dict[str, dict]:
    """Services of this stack whose process is alive and whose ready file exists."""
    found: dict[str, dict] = {}
    for spec in SERVICES:
        pid = _read_pid(stack.pid_path(spec.name))
        ready = stack.ready_path(spec.name)
        if pid is not None and _pid_alive(pid) and ready.exists():
            try:
                info = json.loads(ready.read_text())
            except ValueError:
                continue
            found[spec.name] = {"grpc": info["grpc"], "metrics": info.get("metrics"), "pid": pid}
    return found


def write_endpoints(stack: Stack, pki: Pki) -> Path:
    data = {
        "services": {name: {"grpc": e["grpc"], "metrics": e.get("metrics")}
                     for name, e in stack.ports.items()},
        "tls": {
            "ca": str(pki.ca),
            "identities": {n: f.as_dict() for n, f in sorted(pki.identities.items())},
        },
        "dir": str(stack.directory),
    }
    write_private(stack.endpoints_path, json.dumps(data, indent=2))
    return stack.endpoints_path


def up(directory: Path, *, only: list[str] | None = None,
       access_database: str | None = None) -> Path:
    """Bring the stack up (idempotent); returns the endpoints.json path.

    ``access_database``: a URL for the access server's registry, kept for later
    runs; a running access server on another database is restarted.
    """
    stack = Stack(directory)
    pki = stack.prepare()
    if access_database is not None and access_database != access_database_url(stack):
        save_access_database_url(stack, access_database)
        stop_service(stack, "access_server")
    stack.ports.update(running_services(stack))
    for spec in available_services():
        if only and spec.name not in only:
            continue
        if spec.name in stack.ports and check_health(
                stack.ports[spec.name]["grpc"], stack.tls_files("admin"), spec.health_service,
                server_identity=spec.identity):
            continue
        stop_service(stack, spec.name)
        start_service(stack, spec)
        write_endpoints(stack, pki)
    return write_endpoints(stack, pki)


def down(directory: Path) -> list[str]:
    """Stop every service of the stack, dependents first; returns those stopped."""
    stack = Stack(directory)
    stopped = []
    for spec in reversed(SERVICES):
        if stop_service(stack, spec.name):
            stopped.append(spec.name)
    return stopped
