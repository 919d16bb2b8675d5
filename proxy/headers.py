"""The only place headers are rewritten: hop-by-hop removal, forwarding headers, Location/Link rewriting."""

from __future__ import annotations

import re
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import NamedTuple

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
REWRITTEN_URL_HEADERS = frozenset({"location", "content-location"})
BODY_HEADERS = frozenset({"content-length", "content-type", "content-range", "content-encoding", "content-md5", "digest"})
_LINK_TARGET = re.compile(r"<([^>]*)>")
X_FORWARDED_HEADERS = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
FORWARDING_HEADERS = X_FORWARDED_HEADERS | {"forwarded"}
# The forwarding headers the gateway sets itself, by (forwarded.x_forwarded, forwarded.forwarded): a trusted
# proxy's own are replaced by them, its others kept.
_REBUILT = {
    (x_forwarded, forwarded): (X_FORWARDED_HEADERS if x_forwarded else frozenset())
    | (frozenset({"forwarded"}) if forwarded else frozenset())
    for x_forwarded in (False, True)
    for forwarded in (False, True)
}
# host or [v6]:port, as the registry will put it into URLs: no paths, spaces, quotes or userinfo.
# Peer addresses whose trust is remembered (proxy.headers.trusts); a few KiB.
TRUST_CACHE_SIZE = 1024
_AUTHORITY = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+=-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


class Origins(NamedTuple):
    """The upstream's origin and the gateway's origin as the client addressed it, e.g. "http://host:5000".

    This and ClientView are named tuples, not frozen dataclasses: one of each is made per request, and a
    frozen dataclass costs three times as much to make."""

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


def _unquoted(value: str) -> str:
    value = value.strip()
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value


def _first_forwarded_element(headers: CIMultiDictProxy[str]) -> dict[str, str]:
    """The first RFC 7239 element, as the registry (distribution's parseForwardedHeader) reads it."""
    value = headers.get("Forwarded")
    if not value:
        return {}
    element: dict[str, str] = {}
    for pair in value.split(",")[0].split(";"):
        name, sep, pair_value = pair.partition("=")
        if sep:
            element[name.strip().lower()] = _unquoted(pair_value)
    return element


def _plausible_host(value: str | None) -> str | None:
    return value if value and _AUTHORITY.fullmatch(value) else None


def _ip(address: str | None) -> IPv4Address | IPv6Address | None:
    try:
        return ip_address(address.strip("[]")) if address else None
    except ValueError:
        return None


class TrustedProxies:
    """The networks whose forwarding headers are believed, and which peers were found in them: parsing an
    address and testing each network costs more than the rest of a request's header work, and a gateway sees
    the same few peers (its load balancers, its clients) over and over. At most TRUST_CACHE_SIZE are kept."""

    __slots__ = ("_known", "networks")

    def __init__(self, networks: Iterable[IPv4Network | IPv6Network]) -> None:
        self.networks = tuple(networks)
        self._known: dict[str, bool] = {}

    def __contains__(self, address: str | None) -> bool:
        if not self.networks or address is None:
            return False
        known = self._known.get(address)
        if known is None:
            if len(self._known) >= TRUST_CACHE_SIZE:
                self._known.clear()
            parsed = _ip(address)
            known = self._known[address] = parsed is not None and any(parsed in network for network in self.networks)
        return known


class ClientView(NamedTuple):
    """The client as the gateway believes it: the scheme and host it addressed, and its address.

    Forwarding headers are believed only from a trusted proxy; from anyone else the gateway's own view stands.
    """

    scheme: str
    host: str
    address: str | None
    peer: str | None
    trusted_peer: bool


def client_view(
    headers: CIMultiDictProxy[str],
    peer: str | None,
    own_scheme: str,
    fallback_host: str,
    trusted_proxies: TrustedProxies | Iterable[IPv4Network | IPv6Network],
) -> ClientView:
    proxies = trusted_proxies if isinstance(trusted_proxies, TrustedProxies) else TrustedProxies(trusted_proxies)
    own_host = _plausible_host(headers.get("Host")) or fallback_host
    if peer not in proxies:
        return ClientView(own_scheme, own_host, peer, peer, trusted_peer=False)
    scheme, host = client_scheme_and_host(headers, own_scheme, own_host)
    # The client is the nearest address in the chain that is not one of the trusted proxies.
    chain = [hop.strip() for value in headers.getall("X-Forwarded-For", ()) for hop in value.split(",") if _ip(hop.strip())]
    address = next((hop for hop in reversed(chain) if hop not in proxies), chain[0] if chain else peer)
    return ClientView(scheme, host, address, peer, trusted_peer=True)


def client_scheme_and_host(headers: CIMultiDictProxy[str], own_scheme: str, fallback_host: str) -> tuple[str, str]:
    """How the client addressed the gateway according to a trusted load balancer, as the registry reads it:
    the first Forwarded element when there is one, else X-Forwarded-Proto/Host, else our own view."""
    element = _first_forwarded_element(headers)
    if element:
        scheme_said, host_said = element.get("proto"), element.get("host")
    else:
        scheme_said, host_said = _first(headers, "X-Forwarded-Proto"), _first(headers, "X-Forwarded-Host")
    scheme = scheme_said.lower() if scheme_said and scheme_said.lower() in {"http", "https"} else own_scheme
    host = _plausible_host(host_said) or _plausible_host(headers.get("Host")) or fallback_host
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


def _not_passed_on(headers: CIMultiDictProxy[str], also: frozenset[str] = frozenset()) -> frozenset[str]:
    """Lower-case names dropped from `headers`: hop-by-hop ones, those its Connection header names, `also`."""
    dropped = HOP_BY_HOP | also if also else HOP_BY_HOP
    return dropped | _connection_named(headers) if "Connection" in headers else dropped


def _forwarded_node(address: str | None) -> str:
    return f'"[{address}]"' if address and ":" in address else f'"{address or "unknown"}"'


def upstream_request_headers(
    incoming: CIMultiDictProxy[str],
    *,
    settings: ForwardedSettings,
    view: ClientView,
    own_scheme: str,
    upstream_authority: str | None,
    request_id: str,
) -> CIMultiDict[str]:
    """Headers for the upstream request. `upstream_authority` replaces Host when the client's is not passed on.

    The forwarding headers tell the registry exactly the scheme and host the gateway itself believes (`view`):
    those of a trusted proxy are extended, anyone else's replaced."""
    trusted = view.trusted_peer
    dropped = _not_passed_on(incoming, _REBUILT[settings.x_forwarded, settings.forwarded] if trusted else FORWARDING_HEADERS)
    headers = CIMultiDict([(name, value) for name, value in incoming.items() if name.lower() not in dropped])
    client_host = incoming.get("Host", "")
    if upstream_authority is not None:
        headers["Host"] = upstream_authority
    if settings.x_forwarded:
        chain = [*incoming.getall("X-Forwarded-For", ())] if trusted else []
        if view.peer:
            chain.append(view.peer)
        if chain:
            headers["X-Forwarded-For"] = ", ".join(chain)
        headers["X-Forwarded-Proto"] = view.scheme
        headers["X-Forwarded-Host"] = view.host
    if settings.forwarded:
        # The registry reads only the first element: it must be the client's, as the gateway believes it.
        received = incoming.getall("Forwarded", ()) if trusted else []
        if received:
            element = f"for={_forwarded_node(view.peer)};proto={own_scheme}"
            if client_host:
                element += f';host="{client_host}"'
        else:
            element = f'for={_forwarded_node(view.address)};proto={view.scheme};host="{view.host}"'
        headers["Forwarded"] = ", ".join([*received, element])
    headers["X-Request-Id"] = request_id
    return headers


def downstream_response_headers(
    upstream: CIMultiDictProxy[str], origins: Origins, body_length: int | None = None
) -> CIMultiDict[str]:
    """The upstream's response headers for the client; `body_length` when the gateway changed the body."""
    dropped = _not_passed_on(upstream)
    passed: list[tuple[str, str]] = []
    for name, value in upstream.items():
        lowered = name.lower()
        if lowered in dropped:
            continue
        if lowered == "link":
            value = origins.rewrite_link(value)
        elif lowered in REWRITTEN_URL_HEADERS:
            value = origins.rewrite(value)
        passed.append((name, value))
    headers = CIMultiDict(passed)
    if body_length is not None and "Content-Length" in headers:
        headers["Content-Length"] = str(body_length)
    return headers


def without_body_headers(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """Headers of a client's request reused for a bodiless request the gateway makes on its behalf."""
    return CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in BODY_HEADERS)
