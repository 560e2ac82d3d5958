"""TLS for the SMTP listeners: pyOpenSSL CertificateOptions, TLS 1.2 or newer."""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer


def server_options(cert_path: Path, key_path: Path) -> ssl.CertificateOptions:
    """Options from PEM files: the first certificate is ours, the rest its chain."""
    pem = cert_path.read_bytes()
    certs = x509.load_pem_x509_certificates(pem)
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_path.read_bytes())
    leaf, *chain = (crypto.X509.from_cryptography(c) for c in certs)
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=leaf,
        extraCertChain=chain,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def make_self_signed(cert_path: Path, key_path: Path, hostname: str) -> None:
    """A development certificate (ECDSA P-256, one year), written once."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTLS:
    """The listeners' TLS settings, replaceable while running (SIGHUP reloads the
    certificate): each new connection or STARTTLS takes the current ones."""

    def __init__(self, options: ssl.CertificateOptions) -> None:
        self.options = options

    def getContext(self) -> Any:
        return self.options.getContext()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Any:
        return self.options.serverConnectionForTLS(tlsProtocol)
