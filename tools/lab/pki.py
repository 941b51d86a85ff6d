"""A small X.509 PKI for a fleet: one CA, a broker (server) certificate, one client certificate per
identity (each device, the coordinator). For trials, tests and small deployments; a production
fleet would rather use its own CA tooling, the files are the same PEM files.

Keys are ECDSA P-256 (fast to make, accepted by every OpenSSL a board runs); certificates are
valid from an hour ago (clock skew on boards without RTC) for `days` days. Private keys are
written 0600. Needs the `cryptography` package (the [dev] extra).
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from pqsu.protocol.errors import PqsuError

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError:  # pragma: no cover - depends on the install
    x509 = None


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: CertFiles
    server: CertFiles
    clients: dict[str, CertFiles]


def _require() -> None:
    if x509 is None:
        raise PqsuError("making certificates needs the cryptography package: pip install cryptography")


def _name(common_name: str) -> "x509.Name":
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fl-pqsu"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, cert: "x509.Certificate", key) -> CertFiles:
    files = CertFiles(folder / f"{stem}.crt", folder / f"{stem}.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return files


def _certificate(subject: str, key, issuer: "x509.Name", issuer_key, days: int, *, ca: bool = False,
                 usage=None, hosts: tuple[str, ...] = ()) -> "x509.Certificate":
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, encipher_only=False,
                                          decipher_only=False), critical=True)
    if usage is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        names = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_ca(folder: str | Path, name: str = "fl-pqsu test CA", days: int = 30) -> CertFiles:
    """A self-signed CA in `folder` (ca.crt, ca.key)."""
    _require()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    return _write(folder, "ca", _certificate(name, key, _name(name), key, days, ca=True), key)


def issue(ca: CertFiles, stem: str, common_name: str, *, server_hosts: tuple[str, ...] = (),
          days: int = 30) -> CertFiles:
    """A certificate signed by `ca`, next to it: a server one for `server_hosts` (names or IPs
    in its subjectAltName), else a client one whose CN is `common_name`."""
    _require()
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = _certificate(common_name, key, ca_cert.subject, ca_key, days, usage=usage, hosts=server_hosts)
    return _write(ca.cert.parent, stem, cert, key)


def make_pki(folder: str | Path, clients: list[str], hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
             days: int = 30) -> Pki:
    """A CA, a broker certificate for `hosts` and a client certificate per name in `clients`."""
    ca = make_ca(folder, days=days)
    server = issue(ca, "broker", hosts[0], server_hosts=hosts, days=days)
    return Pki(Path(folder), ca, server, {c: issue(ca, f"client-{c}", c, days=days) for c in clients})
