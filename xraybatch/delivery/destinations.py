"""Destination URLs: where the outputs are delivered.

Tools outside xraybatch write these forms; keep them exactly:

- ``dicom://CALLED_AE@HOST:PORT``: DIMSE C-STORE (PS3.4 Annex B) to the AE ``CALLED_AE``.
- ``dicoms://CALLED_AE@HOST:PORT``: the same over TLS (PS3.15 Annex B, the Basic TLS Secure Transport profile).
- ``http://HOST:PORT/PATH`` and ``https://...``: a DICOMweb base URL; STOW-RS posts to ``{base}/studies``
  (PS3.18 10.5).

The URL as written (without a trailing slash) is the destination's name in the results DB.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from xraybatch.errors import ConfigError

FORMS = "dicom://CALLED_AE@HOST:PORT, dicoms://CALLED_AE@HOST:PORT, http(s)://HOST:PORT/PATH"
_DIMSE = re.compile(r"^(dicoms?)://([^@/]{1,16})@(\[[0-9a-fA-F:]+\]|[^:/@\[\]]+):(\d{1,5})/?$")


@dataclass(frozen=True)
class Destination:
    """One parsed destination URL."""

    url: str  # the name stored in the results DB
    kind: str  # "dimse" or "dicomweb"
    host: str
    port: int
    tls: bool
    called_ae: str = ""  # DIMSE only
    base_url: str = ""  # DICOMweb only: STOW-RS goes to f"{base_url}/studies"

    def __str__(self) -> str:
        return self.url


def parse_destination(url: str) -> Destination:
    """Parse one destination URL.

    Raises
    ------
    ConfigError
        When ``url`` has none of the accepted forms (the message lists them).
    """
    text = url.strip()
    match = _DIMSE.match(text)
    if match:
        scheme, ae, host, port = match.groups()
        ae = ae.strip()
        if not ae or any(ch in ae for ch in "\\") or not ae.isprintable():
            raise ConfigError(f"destination {url!r}: the called AE title must be 1-16 printable characters")
        number = int(port)
        if not 1 <= number <= 65535:
            raise ConfigError(f"destination {url!r}: port {number} is not 1-65535")
        return Destination(text.rstrip("/"), "dimse", host.strip("[]"), number, scheme == "dicoms", called_ae=ae)
    if text.startswith(("http://", "https://")):
        parts = urlsplit(text)
        try:
            port = parts.port
        except ValueError as err:
            raise ConfigError(f"destination {url!r}: {err}") from err
        if not parts.hostname or parts.query or parts.fragment or parts.username or parts.password:
            raise ConfigError(
                f"destination {url!r}: a DICOMweb base URL is http(s)://HOST:PORT/PATH, without query, fragment "
                "or credentials (put those in [delivery] http_token or http_username/http_password)"
            )
        tls = parts.scheme == "https"
        base = text.rstrip("/")
        return Destination(base, "dicomweb", parts.hostname, port or (443 if tls else 80), tls, base_url=base)
    raise ConfigError(f"destination {url!r} is not one of the accepted forms: {FORMS}")


def parse_destinations(urls: tuple[str, ...] | list[str]) -> list[Destination]:
    """Parse several destination URLs, dropping repeats (first one wins)."""
    out: dict[str, Destination] = {}
    for url in urls:
        dest = parse_destination(url)
        out.setdefault(dest.url, dest)
    return list(out.values())
