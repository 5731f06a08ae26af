"""Make the TLS credentials of a Dask cluster: a certificate authority, and a certificate and key
for each role (the scheduler, the workers, the clients that submit runs), signed by it.

    .venv/bin/python scripts/make_certs.py certs/          # ca.pem, scheduler.pem, ...

Every connection of the cluster is then mutual TLS: each side shows a certificate that this CA
signed, so a client or worker without one (or with one from another CA) is refused. Dask checks
the CA, not host names, so one certificate per role serves every host. Keep the folder private:
`ca-key.pem` signs new members of the cluster; give each host only its role's files and ca.pem.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("scheduler", "worker", "client")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "catdog cluster"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created private: the key must never be readable by another user, even for a moment.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # a key file that was already there keeps its own mode else
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_certs(folder: Path, days: int = 365) -> dict[str, Path]:
    """Write ca.pem, ca-key.pem and <role>.pem, <role>-key.pem for every role into `folder`.

    Returns:
        Every file written, by name without the extension.
    """
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)  # the keys' folder: nobody else lists it or swaps files in it
    now = datetime.datetime.now(datetime.UTC)
    lifetime = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("catdog cluster CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(lifetime[0])
        .not_valid_after(lifetime[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    written = {"ca": folder / "ca.pem", "ca-key": folder / "ca-key.pem"}
    _write_cert(written["ca"], ca)
    _write_key(written["ca-key"], ca_key)

    for role in ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"catdog {role}"))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(lifetime[0])
            .not_valid_after(lifetime[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # Every member of a Dask cluster both accepts and opens connections.
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        written[role] = folder / f"{role}.pem"
        written[f"{role}-key"] = folder / f"{role}-key.pem"
        _write_cert(written[role], cert)
        _write_key(written[f"{role}-key"], key)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write the files (created)")
    parser.add_argument("--days", type=int, default=365, help="validity in days (365)")
    args = parser.parse_args(argv)
    for name, path in make_certs(args.folder, args.days).items():
        print(f"{name:16s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
