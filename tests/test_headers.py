"""Header rewriting (proxy/headers.py): hop-by-hop removal, forwarding headers, Location and Link."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import ForwardedSettings, parse_networks
from proxy.headers import (
    TRUST_CACHE_SIZE,
    ClientView,
    Origins,
    TrustedProxies,
    client_scheme_and_host,
    client_view,
    downstream_response_headers,
    origin,
    upstream_request_headers,
)

UPSTREAM = "http://registry:5000"
CLIENT = "https://gateway.example"
ORIGINS = Origins(upstream=UPSTREAM, client=CLIENT)
STATE = "/v2/team/app/blobs/uploads/0b5d?_state=eyJOYW1lIjoidGVhbS9hcHAifQ%3D%3D&digest=sha256%3Aab"

# RFC 9110 §7.6.1 and RFC 2616's older list; the gateway answers Expect itself so never forwards it.
RFC_HOP_BY_HOP = ("Connection", "Proxy-Connection", "Keep-Alive", "TE", "Transfer-Encoding", "Upgrade",
                  "Trailer", "Proxy-Authenticate", "Proxy-Authorization", "Expect")

Pairs = list[tuple[str, str]]


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def upstream_headers(
    incoming: CIMultiDictProxy[str],
    *,
    x_forwarded: bool = True,
    forwarded: bool = True,
    client_address: str | None = "203.0.113.7",
    own_scheme: str = "http",
    upstream_authority: str | None = None,
    trusted: str = "",
) -> Pairs:
    settings = ForwardedSettings(x_forwarded=x_forwarded, forwarded=forwarded, trusted_proxies=parse_networks(trusted))
    return list(
        upstream_request_headers(
            incoming,
            settings=settings,
            view=client_view(incoming, client_address, own_scheme, "fallback:1", settings.trusted_proxies),
            own_scheme=own_scheme,
            upstream_authority=upstream_authority,
            request_id="req-1",
        ).items()
    )


def values(pairs: Pairs, name: str) -> list[str]:
    return [value for key, value in pairs if key.lower() == name.lower()]


# origin() -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "authority", "expected"),
    [
        pytest.param("http", "registry:5000", "http://registry:5000", id="explicit-port"),
        pytest.param("HTTP", "Registry.Example:5000", "http://registry.example:5000", id="lowercased"),
        pytest.param("http", "registry:80", "http://registry", id="http-default-port-dropped"),
        pytest.param("https", "registry:443", "https://registry", id="https-default-port-dropped"),
        pytest.param("http", "registry:443", "http://registry:443", id="https-port-on-http-kept"),
        pytest.param("https", "registry:80", "https://registry:80", id="http-port-on-https-kept"),
        pytest.param("http", "registry:8080", "http://registry:8080", id="port-ending-in-80-kept"),
        pytest.param("http", "registry:180", "http://registry:180", id="port-180-kept"),
        pytest.param("https", "[2001:db8::1]:443", "https://[2001:db8::1]", id="ipv6-default-port"),
        pytest.param("https", "[2001:db8::1]:8443", "https://[2001:db8::1]:8443", id="ipv6-port"),
        pytest.param("http", "registry", "http://registry", id="no-port"),
    ],
)
def test_origin(scheme: str, authority: str, expected: str) -> None:
    assert origin(scheme, authority) == expected


# Origins.rewrite ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(f"{UPSTREAM}/v2/team/app/blobs/sha256:ab", f"{CLIENT}/v2/team/app/blobs/sha256:ab", id="path"),
        pytest.param(UPSTREAM + STATE, CLIENT + STATE, id="upload-state-kept-byte-for-byte"),
        pytest.param("HTTP://REGISTRY:5000/v2/A?B=%3d", CLIENT + "/v2/A?B=%3d", id="case-insensitive-origin"),
        pytest.param(UPSTREAM, CLIENT, id="origin-only"),
        pytest.param(f"{UPSTREAM}?last=a", f"{CLIENT}?last=a", id="query-without-path"),
        pytest.param(f"{UPSTREAM}#frag", f"{CLIENT}#frag", id="fragment-without-path"),
        pytest.param(f"{UPSTREAM}/a//b/../c", f"{CLIENT}/a//b/../c", id="path-not-normalised"),
        pytest.param("http://other:5000/v2/", "http://other:5000/v2/", id="other-host"),
        pytest.param("http://registry:5001/v2/", "http://registry:5001/v2/", id="other-port"),
        pytest.param("http://registry/v2/", "http://registry/v2/", id="no-port"),
        pytest.param("https://registry:5000/v2/", "https://registry:5000/v2/", id="other-scheme"),
        pytest.param("http://registry:50001/v2/", "http://registry:50001/v2/", id="port-prefix"),
        pytest.param("http://registry:5000.evil/v2/", "http://registry:5000.evil/v2/", id="authority-prefix"),
        pytest.param("http://evil/registry:5000/v2/", "http://evil/registry:5000/v2/", id="origin-in-path"),
        pytest.param("http://user@registry:5000/v2/", "http://user@registry:5000/v2/", id="userinfo"),
        pytest.param(f"https://s3.example/bucket?redirect={UPSTREAM}/v2/", f"https://s3.example/bucket?redirect={UPSTREAM}/v2/",
                     id="origin-in-query"),
        pytest.param("/v2/team/app/blobs/uploads/1?_state=a%3D%3D", "/v2/team/app/blobs/uploads/1?_state=a%3D%3D",
                     id="relative"),
        pytest.param("registry:5000/v2/", "registry:5000/v2/", id="no-scheme"),
        pytest.param("", "", id="empty"),
    ],
)
def test_rewrite(url: str, expected: str) -> None:
    assert ORIGINS.rewrite(url) == expected


@pytest.mark.parametrize(
    ("scheme", "authority"),
    [pytest.param("http", "registry:80", id="http-80"), pytest.param("https", "registry:443", id="https-443")],
)
def test_rewrite_maps_an_explicit_default_port(scheme: str, authority: str) -> None:
    origins = Origins(upstream=origin(scheme, authority), client=CLIENT)

    assert origins.rewrite(f"{scheme}://{authority}/v2/a/blobs/uploads/1") == f"{CLIENT}/v2/a/blobs/uploads/1"


@pytest.mark.parametrize(
    ("link", "expected"),
    [
        pytest.param(f'<{UPSTREAM}/v2/_catalog?last=b&n=2>; rel="next"', f'<{CLIENT}/v2/_catalog?last=b&n=2>; rel="next"',
                     id="absolute-next"),
        pytest.param('</v2/_catalog?last=b&n=2>; rel="next"', '</v2/_catalog?last=b&n=2>; rel="next"', id="relative"),
        pytest.param('<https://docs.example/x>; rel="help"', '<https://docs.example/x>; rel="help"', id="other-origin"),
        pytest.param(f'<{UPSTREAM}/a>; rel="next", <https://docs.example/b>; rel="help", <{UPSTREAM}/c>; rel="x"',
                     f'<{CLIENT}/a>; rel="next", <https://docs.example/b>; rel="help", <{CLIENT}/c>; rel="x"',
                     id="several-targets"),
        pytest.param(f'rel="next"; title="{UPSTREAM}/x"', f'rel="next"; title="{UPSTREAM}/x"', id="outside-brackets"),
    ],
)
def test_rewrite_link(link: str, expected: str) -> None:
    assert ORIGINS.rewrite_link(link) == expected


hosts = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]{1,5}){0,2}", fullmatch=True)
ports = st.integers(1, 65535)
schemes = st.sampled_from(["http", "https"])
url_tails = st.text(
    st.sampled_from("abcXYZ019-._~/?#&=%:@!$'()*+,;[]"), max_size=40
).map(lambda tail: "" if not tail else tail if tail[0] in "/?#" else "/" + tail)


@given(schemes, hosts, ports, url_tails, st.booleans())
def test_rewrite_maps_the_upstream_origin_and_keeps_path_and_query(
    scheme: str, host: str, port: int, tail: str, shout: bool
) -> None:
    upstream = f"{scheme}://{host}:{port}"
    origins = Origins(upstream=origin(scheme, f"{host}:{port}"), client=CLIENT)
    url = (upstream.upper() if shout else upstream) + tail

    assert origins.rewrite(url) == CLIENT + tail
    assert origins.rewrite_link(f'<{url}>; rel="next"') == f'<{CLIENT}{tail}>; rel="next"'


@given(schemes, hosts, ports, schemes, hosts, ports, url_tails)
def test_rewrite_never_changes_another_origin(
    scheme: str, host: str, port: int, other_scheme: str, other_host: str, other_port: int, tail: str
) -> None:
    other = f"{other_scheme}://{other_host}:{other_port}"
    origins = Origins(upstream=f"{scheme}://{host}:{port}", client=CLIENT)
    if other == origins.upstream:
        return

    assert origins.rewrite(other + tail) == other + tail
    assert origins.rewrite(f"{other_scheme}://{other_host}{tail}") == f"{other_scheme}://{other_host}{tail}"
    assert origins.rewrite(tail) == tail


# client_scheme_and_host ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("incoming", "own_scheme", "expected"),
    [
        pytest.param(headers(("Host", "gw:5000")), "http", ("http", "gw:5000"), id="own-view"),
        pytest.param(headers(), "https", ("https", "fallback:1"), id="no-host-falls-back"),
        pytest.param(headers(("Host", "gw:5000"), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "reg.example")),
                     "http", ("https", "reg.example"), id="load-balancer"),
        pytest.param(headers(("X-Forwarded-Proto", "https, http"), ("X-Forwarded-Host", "a.example , b.example")),
                     "http", ("https", "a.example"), id="first-of-a-list"),
        pytest.param(headers(("Host", "gw:5000"), ("X-Forwarded-Proto", "")), "http", ("http", "gw:5000"),
                     id="empty-forwarded-proto-ignored"),
        pytest.param(headers(("Host", "gw:5000"), ("X-Forwarded-Host", "")), "http", ("http", "gw:5000"),
                     id="empty-forwarded-host-ignored"),
        pytest.param(headers(("x-forwarded-host", "reg.example")), "http", ("http", "reg.example"),
                     id="case-insensitive"),
    ],
)
def test_client_scheme_and_host(incoming: CIMultiDictProxy[str], own_scheme: str, expected: tuple[str, str]) -> None:
    assert client_scheme_and_host(incoming, own_scheme, "fallback:1") == expected


@pytest.mark.parametrize(
    ("incoming", "expected"),
    [
        pytest.param(headers(("Forwarded", 'for=1.2.3.4;proto=https;host="reg.example"'), ("X-Forwarded-Proto", "http")),
                     ("https", "reg.example"), id="forwarded-wins-as-in-distribution"),
        pytest.param(headers(("Host", "gw"), ("Forwarded", "for=1.2.3.4"), ("X-Forwarded-Proto", "https")),
                     ("http", "gw"), id="forwarded-without-proto-means-own-scheme"),
        pytest.param(headers(("Forwarded", "proto=HTTPS;host=a.example, proto=http;host=b.example")),
                     ("https", "a.example"), id="first-element"),
        pytest.param(headers(("Host", "gw"), ("X-Forwarded-Proto", "gopher"), ("X-Forwarded-Host", "a b/c")),
                     ("http", "gw"), id="implausible-values-ignored"),
        pytest.param(headers(("Host", "gw"), ("X-Forwarded-Host", '[::1]:5000')), ("http", "[::1]:5000"),
                     id="ipv6-host"),
    ],
)
def test_client_scheme_and_host_reads_forwarded_as_the_registry_does(
    incoming: CIMultiDictProxy[str], expected: tuple[str, str]
) -> None:
    assert client_scheme_and_host(incoming, "http", "fallback:1") == expected


LB_HEADERS = headers(("Host", "reg.example"), ("X-Forwarded-Proto", "https"), ("X-Forwarded-For", "198.51.100.9"))


@pytest.mark.parametrize(
    ("peer", "trusted", "expected"),
    [
        pytest.param("127.0.0.1", "127.0.0.0/8", ClientView("https", "reg.example", "198.51.100.9", "127.0.0.1", True),
                     id="trusted-load-balancer"),
        pytest.param("203.0.113.7", "127.0.0.0/8", ClientView("http", "reg.example", "203.0.113.7", "203.0.113.7", False),
                     id="untrusted-client-speaks-for-itself"),
        pytest.param("::1", "::1/128", ClientView("https", "reg.example", "198.51.100.9", "::1", True), id="ipv6-peer"),
        pytest.param(None, "0.0.0.0/0", ClientView("http", "reg.example", None, None, False), id="no-peer"),
        pytest.param("127.0.0.1", "", ClientView("http", "reg.example", "127.0.0.1", "127.0.0.1", False),
                     id="trust-none"),
    ],
)
def test_client_view_believes_only_trusted_proxies(peer: str | None, trusted: str, expected: ClientView) -> None:
    assert client_view(LB_HEADERS, peer, "http", "fallback:1", parse_networks(trusted)) == expected


def test_the_client_is_the_nearest_untrusted_hop() -> None:
    incoming = headers(("X-Forwarded-For", "203.0.113.1, 198.51.100.9, 10.0.0.5"))
    view = client_view(incoming, "10.0.0.6", "http", "fallback:1", parse_networks("10.0.0.0/8"))
    assert view.address == "198.51.100.9"


def test_hops_that_are_not_addresses_are_skipped() -> None:
    incoming = headers(("X-Forwarded-For", '198.51.100.9, 1.2.3.4";proto=http;host="evil, unknown'))
    view = client_view(incoming, "10.0.0.6", "http", "fallback:1", parse_networks("10.0.0.0/8"))
    assert view.address == "198.51.100.9"


def test_behind_a_tls_load_balancer_the_registry_is_told_https_first() -> None:
    """nginx/haproxy terminating TLS set X-Forwarded-Proto only: the registry (which prefers Forwarded) must
    read https in the first Forwarded element, or it hands out http:// upload locations."""
    result = upstream_headers(LB_HEADERS, client_address="127.0.0.1", trusted="127.0.0.0/8")

    assert values(result, "Forwarded") == ['for="198.51.100.9";proto=https;host="reg.example"']
    assert values(result, "X-Forwarded-Proto") == ["https"]
    assert values(result, "X-Forwarded-For") == ["198.51.100.9, 127.0.0.1"]


def test_an_untrusted_clients_forwarding_headers_are_replaced() -> None:
    spoofed = headers(("Host", "gw:5000"), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "evil.example"),
                      ("X-Forwarded-For", "10.1.1.1"), ("Forwarded", "for=10.1.1.1;proto=https;host=evil.example"))

    result = upstream_headers(spoofed, client_address="203.0.113.7", trusted="127.0.0.0/8")

    assert values(result, "X-Forwarded-Proto") == ["http"]
    assert values(result, "X-Forwarded-Host") == ["gw:5000"]
    assert values(result, "X-Forwarded-For") == ["203.0.113.7"]
    assert values(result, "Forwarded") == ['for="203.0.113.7";proto=http;host="gw:5000"']


# upstream_request_headers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in RFC_HOP_BY_HOP])
@pytest.mark.parametrize("spelling", [str, str.lower, str.upper], ids=["as-is", "lower", "upper"])
def test_hop_by_hop_headers_are_not_forwarded(name: str, spelling: Callable[[str], str]) -> None:
    spelled = spelling(name)
    incoming = headers(("Host", "gw:5000"), (spelled, "x"), ("Accept", "*/*"))

    request = upstream_headers(incoming, x_forwarded=False, forwarded=False)
    response = list(downstream_response_headers(incoming, ORIGINS).items())

    assert request == [("Host", "gw:5000"), ("Accept", "*/*"), ("X-Request-Id", "req-1")]
    assert response == [("Host", "gw:5000"), ("Accept", "*/*")]


def test_headers_named_in_connection_are_not_forwarded() -> None:
    incoming = headers(
        ("Connection", "keep-alive, X-Secret , x-other"),
        ("X-Secret", "1"),
        ("Accept", "a"),
        ("X-OTHER", "2"),
        ("Connection", "X-Third"),
        ("X-Third", "3"),
        ("X-Kept", "4"),
    )

    assert upstream_headers(incoming, x_forwarded=False, forwarded=False) == [
        ("Accept", "a"), ("X-Kept", "4"), ("X-Request-Id", "req-1")
    ]
    assert list(downstream_response_headers(incoming, ORIGINS).items()) == [("Accept", "a"), ("X-Kept", "4")]


def test_end_to_end_headers_keep_order_repeats_and_spelling() -> None:
    incoming = headers(
        ("Host", "gw:5000"),
        ("Accept", "application/vnd.oci.image.manifest.v1+json"),
        ("authorization", "Bearer t"),
        ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
        ("Content-Length", "12"),
        ("Accept", "*/*"),
    )

    assert upstream_headers(incoming, x_forwarded=False, forwarded=False) == [
        *incoming.items(), ("X-Request-Id", "req-1")
    ]


@pytest.mark.parametrize(
    ("upstream_authority", "expected_host"),
    [
        pytest.param(None, ["gw.example:443"], id="passed-on"),
        pytest.param("registry:5000", ["registry:5000"], id="replaced"),
    ],
)
def test_host(upstream_authority: str | None, expected_host: list[str]) -> None:
    incoming = headers(("Host", "gw.example:443"), ("Accept", "*/*"))

    result = upstream_headers(incoming, upstream_authority=upstream_authority)

    assert values(result, "Host") == expected_host
    assert result[0] == ("Host", expected_host[0])
    assert values(result, "X-Forwarded-Host") == ["gw.example:443"]
    assert values(result, "Forwarded") == ['for="203.0.113.7";proto=http;host="gw.example:443"']


def test_host_is_added_when_replaced_and_missing() -> None:
    assert values(upstream_headers(headers(), upstream_authority="registry:5000"), "Host") == ["registry:5000"]
    assert values(upstream_headers(headers()), "Host") == []


@pytest.mark.parametrize(
    ("incoming", "client_address", "expected"),
    [
        pytest.param(headers(), "203.0.113.7", ["203.0.113.7"], id="first-hop"),
        pytest.param(headers(("X-Forwarded-For", "198.51.100.1")), "203.0.113.7", ["198.51.100.1, 203.0.113.7"],
                     id="appends"),
        pytest.param(headers(("X-Forwarded-For", "198.51.100.1, 10.0.0.1")), "203.0.113.7",
                     ["198.51.100.1, 10.0.0.1, 203.0.113.7"], id="appends-to-list"),
        pytest.param(headers(), None, [], id="nothing-to-say"),
    ],
)
def test_x_forwarded_for(incoming: CIMultiDictProxy[str], client_address: str | None, expected: list[str]) -> None:
    result = upstream_headers(incoming, client_address=client_address, trusted="203.0.113.0/24")
    assert values(result, "X-Forwarded-For") == expected


def test_x_forwarded_for_of_an_untrusted_client_starts_with_it() -> None:
    result = upstream_headers(headers(("X-Forwarded-For", "198.51.100.1")), client_address="203.0.113.7")
    assert values(result, "X-Forwarded-For") == ["203.0.113.7"]


def test_repeated_forwarding_lines_are_all_kept() -> None:
    incoming = headers(
        ("X-Forwarded-For", "198.51.100.1"),
        ("Forwarded", 'for="198.51.100.1"'),
        ("X-Forwarded-For", "198.51.100.2"),
        ("Forwarded", 'for="198.51.100.2"'),
    )

    result = upstream_headers(incoming, client_address="203.0.113.7", trusted="203.0.113.7/32")

    assert ", ".join(values(result, "X-Forwarded-For")) == "198.51.100.1, 198.51.100.2, 203.0.113.7"
    assert ", ".join(values(result, "Forwarded")) == (
        'for="198.51.100.1", for="198.51.100.2", for="203.0.113.7";proto=http'
    )


@pytest.mark.parametrize(
    ("incoming", "own_scheme", "proto", "host"),
    [
        pytest.param(headers(("Host", "gw:5000")), "https", ["https"], ["gw:5000"], id="set"),
        pytest.param(headers(("Host", "gw:5000"), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "lb.example")),
                     "http", ["https"], ["lb.example"], id="load-balancer-kept"),
        pytest.param(headers(), "http", ["http"], ["fallback:1"], id="no-host-the-upstreams"),
    ],
)
def test_x_forwarded_proto_and_host(
    incoming: CIMultiDictProxy[str], own_scheme: str, proto: list[str], host: list[str]
) -> None:
    result = upstream_headers(incoming, own_scheme=own_scheme, trusted="203.0.113.0/24")

    assert values(result, "X-Forwarded-Proto") == proto
    assert values(result, "X-Forwarded-Host") == host


@pytest.mark.parametrize(
    ("incoming", "client_address", "own_scheme", "expected"),
    [
        pytest.param(headers(("Host", "gw:5000")), "203.0.113.7", "https",
                     'for="203.0.113.7";proto=https;host="gw:5000"', id="first-hop"),
        pytest.param(headers(("Host", "gw:5000"), ("Forwarded", "for=198.51.100.1;proto=https")), "203.0.113.7",
                     "http", 'for=198.51.100.1;proto=https, for="203.0.113.7";proto=http;host="gw:5000"',
                     id="appended"),
        pytest.param(headers(), None, "http", 'for="unknown";proto=http;host="fallback:1"', id="unknown-client-no-host"),
    ],
)
def test_forwarded(
    incoming: CIMultiDictProxy[str], client_address: str | None, own_scheme: str, expected: str
) -> None:
    result = upstream_headers(incoming, client_address=client_address, own_scheme=own_scheme, trusted="203.0.113.0/24")

    assert values(result, "Forwarded") == [expected]


def test_forwarded_brackets_an_ipv6_client() -> None:
    result = upstream_headers(headers(), client_address="2001:db8::1")

    assert values(result, "Forwarded") == ['for="[2001:db8::1]";proto=http;host="fallback:1"']


def test_forwarding_headers_can_be_switched_off() -> None:
    incoming = headers(("Host", "gw:5000"), ("X-Forwarded-For", "198.51.100.1"), ("Forwarded", "for=198.51.100.1"))

    result = upstream_headers(incoming, x_forwarded=False, forwarded=False, trusted="203.0.113.7/32")

    assert result == [*incoming.items(), ("X-Request-Id", "req-1")]


def test_switched_off_an_untrusted_clients_forwarding_headers_are_dropped() -> None:
    incoming = headers(("Host", "gw:5000"), ("X-Forwarded-For", "198.51.100.1"), ("Forwarded", "for=198.51.100.1"))

    result = upstream_headers(incoming, x_forwarded=False, forwarded=False)

    assert result == [("Host", "gw:5000"), ("X-Request-Id", "req-1")]


def test_only_x_forwarded_switched_off() -> None:
    result = upstream_headers(headers(("Host", "gw:5000")), x_forwarded=False)

    assert [name for name, _ in result] == ["Host", "Forwarded", "X-Request-Id"]


def test_request_id_replaces_the_clients() -> None:
    result = upstream_headers(headers(("X-Request-Id", "spoofed"), ("X-Request-Id", "again")))

    assert values(result, "X-Request-Id") == ["req-1"]


# downstream_response_headers -------------------------------------------------------------------------------


def test_response_location_headers_are_rewritten() -> None:
    upstream = headers(
        ("Location", UPSTREAM + STATE),
        ("content-location", f"{UPSTREAM}/v2/a/manifests/sha256:ab"),
        ("Link", f'<{UPSTREAM}/v2/_catalog?last=b&n=2>; rel="next"'),
        ("Docker-Upload-UUID", "0b5d"),
        ("X-Location", f"{UPSTREAM}/kept"),
        ("Range", "0-99"),
    )

    assert list(downstream_response_headers(upstream, ORIGINS).items()) == [
        ("Location", CLIENT + STATE),
        ("content-location", f"{CLIENT}/v2/a/manifests/sha256:ab"),
        ("Link", f'<{CLIENT}/v2/_catalog?last=b&n=2>; rel="next"'),
        ("Docker-Upload-UUID", "0b5d"),
        ("X-Location", f"{UPSTREAM}/kept"),
        ("Range", "0-99"),
    ]


def test_response_location_elsewhere_is_kept() -> None:
    location = "https://s3.example/bucket/blob?X-Amz-Signature=ab%3D%3D"

    assert list(downstream_response_headers(headers(("Location", location)), ORIGINS).items()) == [
        ("Location", location)
    ]


# Properties over generated header lists -----------------------------------------------------------------------

END_TO_END = ("Accept", "accept", "User-Agent", "Authorization", "Content-Type", "Content-Length", "Range",
              "Docker-Content-Digest", "X-Custom", "x-custom", "WWW-Authenticate", "Etag")
TOKENS = END_TO_END + ("close", "keep-alive", "X-Unrelated")
header_values = st.text(st.sampled_from("abcXYZ0129 ;=/\"*.-"), max_size=12)
connection_values = st.lists(st.sampled_from(TOKENS), max_size=3).map(", ".join)
header_lists = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(END_TO_END + RFC_HOP_BY_HOP + tuple(n.lower() for n in RFC_HOP_BY_HOP)),
                  header_values),
        st.tuples(st.sampled_from(["Connection", "connection"]), connection_values),
    ),
    max_size=12,
)


def expected_end_to_end(pairs: Pairs) -> Pairs:
    dropped = {name.lower() for name in RFC_HOP_BY_HOP}
    dropped |= {
        token.strip().lower() for name, value in pairs if name.lower() == "connection" for token in value.split(",")
    }
    return [(name, value) for name, value in pairs if name.lower() not in dropped]


@given(header_lists)
def test_request_headers_drop_exactly_hop_by_hop_and_connection_named(pairs: Pairs) -> None:
    result = upstream_headers(headers(*pairs), x_forwarded=False, forwarded=False)

    assert result == [*expected_end_to_end(pairs), ("X-Request-Id", "req-1")]


@given(header_lists)
def test_response_headers_drop_exactly_hop_by_hop_and_connection_named(pairs: Pairs) -> None:
    assert list(downstream_response_headers(headers(*pairs), ORIGINS).items()) == expected_end_to_end(pairs)


@given(header_lists, st.none() | st.just("registry:5000"), st.none() | st.just("203.0.113.7"))
def test_forwarding_only_adds_its_own_headers(
    pairs: Pairs, upstream_authority: str | None, client_address: str | None
) -> None:
    incoming = headers(("Host", "gw:5000"), *pairs)
    named = {token.strip().lower() for token in ",".join(incoming.getall("Connection", ())).split(",")}

    result = upstream_headers(incoming, upstream_authority=upstream_authority, client_address=client_address)
    own = {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-request-id"}

    assert {name.lower() for name, _ in result} & ({n.lower() for n in RFC_HOP_BY_HOP} | named) == set()
    assert [pair for pair in result if pair[0].lower() not in own] == [
        pair for pair in expected_end_to_end(list(incoming.items())) if pair[0].lower() not in own
    ]
    assert values(result, "Host") == [upstream_authority or "gw:5000"]


def test_trust_is_decided_per_network_list_however_often_asked() -> None:
    ten, private, nobody = (TrustedProxies(parse_networks(text)) for text in ("10.0.0.0/8", "192.168.0.0/16", ""))
    for _ in range(2):  # the second time from what each remembers
        assert "10.1.2.3" in ten
        assert "10.1.2.3" not in private
        assert "10.1.2.3" not in nobody
        assert "10.1.2.300" not in ten
        assert None not in ten
        assert "[::1]" in TrustedProxies(parse_networks("::1/128"))


def test_trusted_proxies_remember_a_bounded_number_of_peers() -> None:
    proxies = TrustedProxies(parse_networks("10.0.0.0/8"))
    peers = [f"10.0.{index // 256}.{index % 256}" for index in range(TRUST_CACHE_SIZE + 10)]
    assert all(peer in proxies for peer in peers)
    assert "11.0.0.1" not in proxies
    assert len(proxies._known) <= TRUST_CACHE_SIZE
