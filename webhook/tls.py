"""The TLS server context: TLS 1.2 or newer, with certificate files re-read when they change on disk.

Kubernetes updates a mounted Secret in place by swapping a ``..data`` symlink, so a rotated certificate appears
under the same path with a new inode. Rather than a restart (which would drop in-flight admissions) the context
checks the files' identity on every new TLS handshake, from the SNI callback, which OpenSSL calls for each
ClientHello whether or not the client sent a server name. When the files changed it builds a fresh context and
switches the handshaking connection to it; later connections get the fresh one directly. A fresh context per
rotation (instead of ``load_cert_chain`` on the live one) matters: loading a new certificate whose key is not
yet in place would leave the live context half-updated, whereas a failed fresh load just keeps the old one.
Cost per handshake: two ``stat`` calls.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path

log = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def server_context(cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> ssl.SSLContext:
    """A server context with the policy we serve: TLS 1.2+, no client certificates, the given key pair."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    return ctx


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()  # follows the ..data symlink, so a Secret update shows as a new inode
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class ReloadingContext:
    """Owns the server SSLContext handed to uvicorn; swaps in a new certificate when the files change.

    ``context`` is the object given to the listening socket; ``current`` is the context of the newest loaded
    certificate (the same object until the first rotation).
    """

    def __init__(self, cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> None:
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self._lock = threading.Lock()
        signature = self._signature()
        self.cert_pem: bytes | None = self.cert_file.read_bytes()
        self.context = server_context(self.cert_file, self.key_file)  # fails loudly at start-up
        self.context.sni_callback = self._on_client_hello
        self.current = self.context
        self._loaded = signature
        self._failed: tuple[object, ...] | None = None  # the signature (or the error) that last failed to load
        self.reloads = 0

    def _signature(self) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
        return (_identity(self.cert_file), _identity(self.key_file))

    def reload_if_changed(self) -> ssl.SSLContext:
        """Return the context for the certificate now on disk, loading it if the files changed.

        A load that fails (files mid-write, key not matching the certificate) keeps the previous context and is
        retried on the next handshake; it is logged once per distinct file state.
        """
        try:
            signature = self._signature()
        except OSError as exc:
            if self._failed != ("missing", str(exc)):
                self._failed = ("missing", str(exc))
                log.warning("tls certificate files unreadable, keeping the loaded certificate: %s", exc)
            return self.current
        if signature == self._loaded or signature == self._failed:
            return self.current
        with self._lock:
            if signature == self._loaded:
                return self.current
            try:
                # Read before loading: if the files change in between, the signature changes too and the next
                # handshake loads again, so cert_pem never stays behind what is served.
                cert_pem = self.cert_file.read_bytes()
                fresh = server_context(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                self._failed = signature
                log.warning("tls certificate reload failed, keeping the loaded certificate: %s", exc)
                return self.current
            self.current = fresh
            self.cert_pem = cert_pem
            self._loaded = signature
            self._failed = None
            self.reloads += 1
            log.info("tls certificate reloaded from %s", self.cert_file)
            return fresh

    def _on_client_hello(self, ssl_obj: ssl.SSLObject, server_name: str | None, original_ctx: ssl.SSLContext) -> None:
        ctx = self.reload_if_changed()
        if ssl_obj.context is not ctx:
            ssl_obj.context = ctx
        return None
