"""A private Mosquitto that enforces a fleet's identities, and the files each identity needs.

What it sets up (docs/protocol.md, "Security"):

- TLS only: one listener on 127.0.0.1, a client certificate signed by the fleet's CA is
  required (`require_certificate`), plain MQTT on that port fails the handshake;
- a password per identity (Mosquitto's PBKDF2-SHA512 password file, no anonymous access);
- the fleet ACL (`fleet_acl`): a device (any user not named in the file) may publish only
  `update/<its user>` and `status/<its user>` and read only `round` and `model/+`; the
  coordinator has its own user and rights; a monitor user may read the whole fleet;
- per device an HMAC key (signs its updates) and the coordinator's keys file (`--keys`).

`remove(user)` takes an identity out of the password file and reloads Mosquitto (SIGHUP):
the broker then refuses its connections. Used by the security tests and the reliability
report (`pqsu.tools.reliability.security`).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from pqsu.protocol.atomic import atomic_write
from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.topics import check_device, check_fleet
from pqsu.tools.lab.broker import BrokerError, Mosquitto, Service
from pqsu.tools.lab.pki import make_pki

COORDINATOR = "pqsu-coordinator"
MONITOR = "pqsu-monitor"
RELOADED = "Reloading config."  # what Mosquitto logs on SIGHUP


def password_line(user: str, password: str, iterations: int = 101) -> str:
    """One line of a Mosquitto 2 password file (what `mosquitto_passwd` writes: PBKDF2-SHA512)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"{user}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def fleet_acl(fleet: str, coordinator: str = COORDINATOR, monitor: str = MONITOR, *,
              permissive: bool = False) -> str:
    """The ACL file of one fleet. `permissive` is a deliberate misconfiguration for tests: any
    device may publish any device's update topic (update/+ instead of update/%u)."""
    p = f"pqsu/{check_fleet(fleet)}"
    own_update = f"{p}/update/+" if permissive else f"{p}/update/%u"
    return "\n".join([
        "# devices: every user, by pattern (%u = the MQTT user name, which is the device id)",
        f"pattern write {own_update}",
        f"pattern write {p}/status/%u",
        f"pattern read {p}/round",
        f"pattern read {p}/model/+",
        f"user {coordinator}",
        f"topic readwrite {p}/round",   # it reads its own retained announcement back (lost-state check)
        f"topic write {p}/model/+",
        f"topic write {p}/metrics",
        f"topic readwrite {p}/lease",    # one coordinator per fleet: it reads the lease before taking it
        f"topic readwrite {p}/probe/+",  # its preflight: does the broker pass a frame of the chunk limit?
        f"topic read {p}/update/+",
        f"topic read {p}/status/+",
        f"user {monitor}",
        f"topic read {p}/#",
        ""])


@dataclass(frozen=True)
class Identity:
    user: str              # MQTT user name; a device's is its device id
    cert: Path
    key: Path
    password_file: Path    # for --password-file (0600)
    password: str = field(repr=False)
    hmac_key: bytes | None = field(default=None, repr=False)  # devices: signs their updates
    key_file: Path | None = None                                # for --key-file (hex, 0600)


class SecureBroker(Service):
    """Mosquitto on a free loopback port with TLS, passwords and the fleet ACL (see the module doc)."""

    def __init__(self, folder: str | Path, fleet: str, devices: list[str], *, coordinator: str = COORDINATOR,
                 monitor: str = MONITOR):
        self.folder, self.fleet = Path(folder), check_fleet(fleet)
        self.folder.mkdir(parents=True, exist_ok=True)
        devices = [check_device(d) for d in devices]
        self.coordinator, self.monitor = coordinator, monitor
        self.pki = make_pki(self.folder / "pki", [*devices, coordinator, monitor])
        self.identities: dict[str, Identity] = {}
        for user, files in self.pki.clients.items():
            password = secrets.token_urlsafe(18)
            hmac_key = secrets.token_bytes(32) if user in devices else None
            ident = Identity(user, files.cert, files.key, self.folder / f"{user}.password", password, hmac_key,
                             self.folder / f"{user}.hmac" if hmac_key else None)
            _write_secret(ident.password_file, password + "\n")
            if hmac_key:
                _write_secret(ident.key_file, hmac_key.hex() + "\n")
            self.identities[user] = ident
        self.password_path, self.acl_path = self.folder / "mosquitto.passwd", self.folder / "mosquitto.acl"
        self.keys_path = self.folder / "device-keys.json"
        self.admitted = set(self.identities)
        self._write_passwords()
        self.set_acl(permissive=False, reload=False)
        self.write_keys(devices)
        tls = [f"cafile {self.pki.ca.cert}", f"certfile {self.pki.server.cert}", f"keyfile {self.pki.server.key}",
               "require_certificate true", f"password_file {self.password_path}", f"acl_file {self.acl_path}"]
        # The launcher's single listener takes these TLS options: there is no plain listener at all.
        self.broker = Mosquitto(self.folder / "broker", anonymous=False, persistence=False,
                                extra_config="\n".join(tls))

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    @property
    def devices(self) -> list[str]:
        return sorted(u for u, i in self.identities.items() if i.hmac_key is not None)

    def start(self) -> "SecureBroker":
        self.broker.start()
        return self

    def close(self) -> None:
        self.broker.close()

    def client(self, user: str, client_id: str | None = None, *, password: str | None = None,
               cert: bool = True, url: str | None = None, **kwargs) -> MqttClient:
        """An MQTT client with `user`'s credentials (not connected). `client_id` defaults to the
        user; `password`, `cert=False` and `url` let a test present wrong credentials."""
        ident = self.identities[user]
        tls = dict(tls_ca=str(self.pki.ca.cert), tls_cert=str(ident.cert), tls_key=str(ident.key)) if cert else \
            dict(tls_ca=str(self.pki.ca.cert))
        url = url or self.url
        if not url.startswith("mqtts://"):
            tls = {}
        return MqttClient(url, client_id or user, username=user,
                          password=ident.password if password is None else password, **tls, **kwargs)

    def cli_flags(self, user: str) -> list[str]:
        """`pqsu cloud` / `pqsu edge run` flags that connect as `user`."""
        ident = self.identities[user]
        return ["--broker", self.url, "--tls-ca", str(self.pki.ca.cert), "--tls-cert", str(ident.cert),
                "--tls-key", str(ident.key), "--username", user, "--password-file", str(ident.password_file)]

    def write_keys(self, devices: list[str]) -> Path:
        """The coordinator's keys file ({device: hex HMAC key}) for `devices`, replaced atomically."""
        keys = {d: self.identities[d].hmac_key.hex() for d in devices}
        atomic_write(self.keys_path, (json.dumps(keys, indent=2) + "\n").encode())
        return self.keys_path

    def remove(self, user: str) -> None:
        """Take `user` out of the password file and reload: the broker refuses it from now on."""
        self.admitted.discard(user)
        self._write_passwords()
        self.reload()

    def set_acl(self, *, permissive: bool, reload: bool = True) -> None:
        atomic_write(self.acl_path, fleet_acl(self.fleet, self.coordinator, self.monitor,
                                              permissive=permissive).encode())
        if reload:
            self.reload()

    def reload(self, timeout_s: float = 5.0) -> None:
        """SIGHUP: Mosquitto re-reads its password and ACL files (the listener and TLS stay) and
        closes the connections of users no longer in the password file. Returns once its log
        says it reloaded, so what follows meets the new rules."""
        if self.broker.proc is None:
            return
        before = self.broker.log_text().count(RELOADED)
        self.broker.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while self.broker.log_text().count(RELOADED) <= before:
            if time.monotonic() > deadline:
                raise BrokerError(f"mosquitto did not reload its configuration within {timeout_s:g}s")
            time.sleep(0.02)

    def _write_passwords(self) -> None:
        lines = [password_line(u, self.identities[u].password) for u in sorted(self.admitted)]
        atomic_write(self.password_path, ("\n".join(lines) + "\n").encode())


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
