"""TLS for the relay's own listeners: one server context per listener, reloadable in place.

One job: build an `ssl.SSLContext` from a listener's certificate, key and minimum version, and
load a renewed certificate into the same context on SIGHUP, so sessions that are open keep
theirs and new ones get the new one without a restart. A reload that fails (a missing file, a
key that does not match) leaves the running certificate in place. TLS 1.0 and 1.1 are possible
only on a listener marked `legacy_tls` (OpenSSL 3 needs security level 0 for them).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509

from relay.config import ListenerSettings

VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}


class TlsConfigError(Exception):
    """The certificate or key cannot be used; the message says which file and why."""


def server_context(listener: ListenerSettings) -> ssl.SSLContext | None:
    """The server context of a TLS listener; None for a plain one."""
    if listener.tls == "none":
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    configure(context, listener)
    return context


def configure(context: ssl.SSLContext, listener: ListenerSettings) -> None:
    """Versions, ciphers and certificate of `listener`, set on a live context: the sessions
    that start afterwards use them (a reload changes a listener without closing it)."""
    load_certificate(context, listener)  # first: a bad file changes nothing at all
    context.minimum_version = VERSIONS[listener.tls_min_version]
    context.set_ciphers("DEFAULT:@SECLEVEL=0" if listener.legacy_tls else "DEFAULT")


def load_certificate(context: ssl.SSLContext, listener: ListenerSettings) -> None:
    """Load the listener's certificate chain and key into `context`, after proving on a
    scratch context that they load and match, so a bad file never half-replaces a good one."""
    assert listener.tls_cert_file is not None
    _try_load(
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), listener.tls_cert_file, listener.tls_key_file
    )
    _try_load(context, listener.tls_cert_file, listener.tls_key_file)


def _try_load(context: ssl.SSLContext, cert: Path, key: Path | None) -> None:
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except (OSError, ssl.SSLError) as exc:
        files = f"{cert}" + (f" and {key}" if key else "")
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise TlsConfigError(f"cannot use the certificate in {files}: {reason}") from None


def certificate_expiry(cert_file: Path) -> float | None:
    """When the first certificate in a PEM file expires (epoch seconds), or None when it
    cannot be read (the loader reports why)."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return None
    return certificate.not_valid_after_utc.timestamp()
