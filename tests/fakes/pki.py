"""Throw-away PKI for tests: a trustme CA, a server certificate, app certificates.

Job: give every fake that speaks TLS (the Entra fake, the Exchange fake) a
server certificate for ``127.0.0.1``, ``::1`` and ``localhost`` signed by one
test CA, and give tests self-signed RSA 2048 "app registration" certificates
like the ones administrators upload to an Entra application.

Limits: everything is generated at test time into a directory the caller
owns (normally pytest's ``tmp_path``); nothing is cached or committed. Files
holding key material are written with mode 0600. The CA has no CRL/OCSP and
client certificates are not meant for TLS client authentication.
"""

from __future__ import annotations

import base64
import datetime
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

SERVER_IDENTITIES: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def write_private_file(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` readable by the owner only (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)  # the file may have existed with a wider mode
    return path


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 ``x5t`` / ``x5t#S256`` form)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class ClientCertificate:
    """A self-signed application certificate (Entra "certificate credential").

    ``thumbprint_sha256_b64url`` is unpadded base64url (RFC 7515); MSAL puts
    the padded form into its ``x5t#S256`` header, and the Entra fake accepts
    both.
    """

    pem_file: Path  # certificate + private key in one file (relay `certificate_file`)
    certificate_pem: str  # what an admin uploads to the app registration
    private_key_pem: str
    thumbprint_sha1_hex: str  # upper-case hex, as the Azure portal shows it
    thumbprint_sha256_b64url: str

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate_pem.encode("ascii"))


@dataclass(frozen=True)
class TestPKI:
    """Files of one test PKI; contexts are built on demand from the files."""

    __test__ = False  # not a pytest test class despite the name

    ca_file: Path  # PEM of the CA that signed the server certificate
    server_cert_file: Path  # PEM chain for 127.0.0.1, ::1 and localhost
    server_key_file: Path
    directory: Path

    def server_context(self) -> ssl.SSLContext:
        """A TLS server context (TLS 1.2 minimum) with the server certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.server_cert_file, self.server_key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A verifying TLS client context that trusts the test CA only."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def make_client_certificate(self, name: str, *, valid_days: int = 365) -> ClientCertificate:
        """Create a self-signed RSA 2048 certificate with subject ``CN=name``.

        ``valid_days`` may be negative to get an already expired certificate.
        Writes ``<directory>/<name>.pem`` holding the certificate and the key.
        """
        if not _SAFE_NAME.match(name):
            raise ValueError(f"unsuitable certificate name: {name!r}")
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        certificate = make_self_signed_certificate(key, name, valid_days=valid_days)
        certificate_pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
        private_key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii")
        pem_file = write_private_file(
            self.directory / f"{name}.pem", (certificate_pem + private_key_pem).encode("ascii")
        )
        return ClientCertificate(
            pem_file=pem_file,
            certificate_pem=certificate_pem,
            private_key_pem=private_key_pem,
            thumbprint_sha1_hex=certificate.fingerprint(hashes.SHA1()).hex().upper(),
            thumbprint_sha256_b64url=b64url(certificate.fingerprint(hashes.SHA256())),
        )


def make_self_signed_certificate(
    key: rsa.RSAPrivateKey, name: str, *, valid_days: int = 365
) -> x509.Certificate:
    """A self-signed end-entity certificate ``CN=name`` for ``key``."""
    now = datetime.datetime.now(datetime.UTC)
    not_after = now + datetime.timedelta(days=valid_days)
    not_before = min(now, not_after) - datetime.timedelta(days=1)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def make_pki(directory: Path) -> TestPKI:
    """Create a CA and a server certificate under ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="oauth-relay tests")
    server = ca.issue_cert(*SERVER_IDENTITIES)
    chain = b"".join(blob.bytes() for blob in server.cert_chain_pems)
    return TestPKI(
        ca_file=write_private_file(directory / "ca.pem", ca.cert_pem.bytes()),
        server_cert_file=write_private_file(directory / "server-chain.pem", chain),
        server_key_file=write_private_file(
            directory / "server-key.pem", server.private_key_pem.bytes()
        ),
        directory=directory,
    )
