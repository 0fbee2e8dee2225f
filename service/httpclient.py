"""The HTTP sink's outbound client, one pool per sink, and the TLS verification it
shares with the webhook channel: as configured, nothing from the environment."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx

__all__ = ["client", "verification"]


def verification(verify_tls: bool, ca_file: Path | None) -> ssl.SSLContext | bool:
    """What to verify the server's certificate with: the system's CAs, a private CA
    (`ca_file`), or nothing (`verify_tls: false`, for a test server). Raises
    `ValueError` naming the file when `ca_file` cannot be used."""
    if ca_file is None:
        return verify_tls
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"ca_file {ca_file}: {e}") from None
    if not verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def client(
    *, verify: ssl.SSLContext | bool, timeout_s: float, concurrency: int
) -> httpx.AsyncClient:
    """A pooled client: up to `concurrency` connections, kept alive and reused."""
    return httpx.AsyncClient(
        verify=verify,
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        follow_redirects=False,
        # .netrc credentials and proxy settings from the environment are not the
        # configuration's: a sink or channel talks to what its settings name, nothing else.
        trust_env=False,
    )
