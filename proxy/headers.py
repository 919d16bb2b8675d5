"""The only place headers are rewritten: hop-by-hop removal, forwarding headers, Location/Link rewriting."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import ForwardedSettings

# RFC 9110 §7.6.1 and the legacy names proxies still drop. Expect is answered by the gateway itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
REWRITTEN_URL_HEADERS = ("Location", "Content-Location")
BODY_HEADERS = frozenset({"content-length", "content-type", "content-range", "content-encoding", "content-md5", "digest"})
_LINK_TARGET = re.compile(r"<([^>]*)>")


@dataclass(frozen=True, slots=True)
class Origins:
    """The upstream's origin and the gateway's origin as the client addressed it, e.g. "http://host:5000"."""

    upstream: str
    client: str

    def rewrite(self, url: str) -> str:
        """`url` with the upstream's origin replaced by the client's; any other URL unchanged."""
        scheme, sep, rest = url.partition("://")
        if not sep:
            return url
        authority_end = len(rest)
        for delimiter in "/?#":
            position = rest.find(delimiter)
            if position != -1:
                authority_end = min(authority_end, position)
        if origin(scheme, rest[:authority_end]) != self.upstream:
            return url
        return self.client + rest[authority_end:]

    def rewrite_link(self, value: str) -> str:
        return _LINK_TARGET.sub(lambda match: f"<{self.rewrite(match.group(1))}>", value)


def origin(scheme: str, authority: str) -> str:
    scheme = scheme.lower()
    authority = authority.lower()
    default_port = {"http": ":80", "https": ":443"}.get(scheme)
    if default_port and authority.endswith(default_port):
        authority = authority[: -len(default_port)]
    return f"{scheme}://{authority}"


def _first(headers: CIMultiDictProxy[str] | CIMultiDict[str], name: str) -> str | None:
    value = headers.get(name)
    return value.split(",")[0].strip() if value else None


def client_scheme_and_host(headers: CIMultiDictProxy[str], own_scheme: str, fallback_host: str) -> tuple[str, str]:
    """How the client addressed the gateway: a load balancer's X-Forwarded-* first, else our own view."""
    scheme = _first(headers, "X-Forwarded-Proto") or own_scheme
    host = _first(headers, "X-Forwarded-Host") or headers.get("Host") or fallback_host
    return scheme, host


def _forwarded_pairs(value: str) -> dict[str, str]:
    """The first (client-most) element of an RFC 7239 Forwarded header, as lower-cased keys."""
    element = value.split(",", 1)[0]
    pairs = {}
    for pair in element.split(";"):
        key, sep, item = pair.partition("=")
        if sep:
            pairs[key.strip().lower()] = item.strip().strip('"')
    return pairs


def registry_origin(upstream_headers: CIMultiDict[str]) -> str:
    """The origin CNCF distribution (2.8) builds its absolute URLs from, for a request with these headers: the
    first Forwarded element's proto and host, else X-Forwarded-Proto and -Host, else plain HTTP and Host."""
    forwarded = _forwarded_pairs(upstream_headers.get("Forwarded", ""))
    scheme = forwarded.get("proto") or _first(upstream_headers, "X-Forwarded-Proto") or "http"
    host = forwarded.get("host") or _first(upstream_headers, "X-Forwarded-Host") or upstream_headers.get("Host") or ""
    return origin(scheme, host)


def _connection_named(headers: CIMultiDictProxy[str]) -> set[str]:
    return {token.strip().lower() for value in headers.getall("Connection", ()) for token in value.split(",")}


def _end_to_end(headers: CIMultiDictProxy[str]) -> Iterable[tuple[str, str]]:
    dropped = HOP_BY_HOP | _connection_named(headers)
    return ((name, value) for name, value in headers.items() if name.lower() not in dropped)


def upstream_request_headers(
    incoming: CIMultiDictProxy[str],
    *,
    settings: ForwardedSettings,
    client_address: str | None,
    own_scheme: str,
    upstream_authority: str | None,
    request_id: str,
) -> CIMultiDict[str]:
    """Headers for the upstream request. `upstream_authority` replaces Host when the client's is not passed on."""
    headers = CIMultiDict(_end_to_end(incoming))
    client_host = incoming.get("Host", "")
    if upstream_authority is not None:
        headers["Host"] = upstream_authority
    if settings.x_forwarded:
        if client_address:
            headers["X-Forwarded-For"] = ", ".join([*incoming.getall("X-Forwarded-For", ()), client_address])
        headers.setdefault("X-Forwarded-Proto", own_scheme)
        if client_host:
            headers.setdefault("X-Forwarded-Host", client_host)
    if settings.forwarded:
        node = f"[{client_address}]" if client_address and ":" in client_address else client_address or "unknown"
        element = f'for="{node}";proto={own_scheme}'
        if client_host:
            element += f';host="{client_host}"'
        headers["Forwarded"] = ", ".join([*incoming.getall("Forwarded", ()), element])
    headers["X-Request-Id"] = request_id
    return headers


def downstream_response_headers(
    upstream: CIMultiDictProxy[str], origins: Origins, body_length: int | None = None
) -> CIMultiDict[str]:
    """The upstream's response headers for the client; `body_length` when the gateway changed the body."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in _end_to_end(upstream):
        if name.lower() == "link":
            value = origins.rewrite_link(value)
        elif name.title() in REWRITTEN_URL_HEADERS:
            value = origins.rewrite(value)
        headers.add(name, value)
    if body_length is not None and "Content-Length" in headers:
        headers["Content-Length"] = str(body_length)
    return headers


def without_body_headers(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """Headers of a client's request reused for a bodiless request the gateway makes on its behalf."""
    return CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in BODY_HEADERS)
