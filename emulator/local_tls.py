"""A throwaway certificate authority and one certificate signed by it, for mutual TLS between the parts
of one embedded server (SeaweedFS's master, volume server, filer and S3 gateway).

Made fresh at every start and never reused: the authority's key is not even written down, so the only
client certificate it ever signs is the one the server's own parts hold (in a 0600 file). Any other
local user who reaches an internal port has none, and the handshake fails."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from .local_secrets import private_folder, write_private

COMMON_NAME = "rtqcc-embedded"


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls_files(folder: Path, *, days: int = 3650) -> TlsFiles:
    """Write ca.crt, node.crt and node.key (a certificate for 127.0.0.1, server and client) into `folder`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    lifetime = {"not_valid_before": now - datetime.timedelta(minutes=5),
                "not_valid_after": now + datetime.timedelta(days=days)}

    def certificate(subject: x509.Name, public_key, issuer: x509.Name, signing_key, extensions) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(lifetime["not_valid_before"]).not_valid_after(lifetime["not_valid_after"]))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{COMMON_NAME} authority")])
    ca = certificate(ca_name, ca_key.public_key(), ca_name, ca_key, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                       encipher_only=False, decipher_only=False), True),
    ])
    node_key = ec.generate_private_key(ec.SECP256R1())
    node = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)]), node_key.public_key(),
                       ca_name, ca_key, [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
         False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False),
    ])
    private_folder(folder)
    files = TlsFiles(folder / "ca.crt", folder / "node.crt", folder / "node.key")
    write_private(files.ca, ca.public_bytes(serialization.Encoding.PEM).decode())
    write_private(files.cert, node.public_bytes(serialization.Encoding.PEM).decode())
    write_private(files.key, node_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()).decode())
    return files
