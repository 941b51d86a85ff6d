"""The command-line flags with which a coordinator, an agent or a board bundle proves its identity to
the broker: TLS files and an MQTT user. One definition, so `pqsu cloud`, `pqsu edge run` and
`pqsu flash` spell and explain them alike."""
from __future__ import annotations

import argparse
from pathlib import Path

from pqsu.protocol.errors import PqsuError


def add_identity_arguments(group: argparse._ArgumentGroup, whose: str) -> None:
    """--tls-ca, --tls-cert, --tls-key, --username, --password-file; `whose` names the owner in the help
    ("the coordinator's", "this device's")."""
    group.add_argument("--tls-ca", metavar="FILE", help="CA certificate(s) of an mqtts:// broker (default: the system CAs)")
    group.add_argument("--tls-cert", metavar="FILE", help=f"{whose} client certificate (PEM)")
    group.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    group.add_argument("--username", help="MQTT user name (overrides one in the broker URL)")
    group.add_argument("--password-file", metavar="FILE", help="file holding the MQTT password (keep it 0600)")


def read_password_file(path: str | None) -> str | None:
    """The MQTT password from a --password-file (its first line, without the newline); None without one."""
    if not path:
        return None
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PqsuError(f"cannot read the password file {path}: {exc.strerror or exc}") from None
    return text.splitlines()[0] if text else ""
