"""What a request path means to the gateway (proxy/routes.py)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.routes import RouteKind, RouteMatch, clean_path, match_route

DIGEST = "sha256:" + "0123456789abcdef" * 4
SESSION = "6f8e3d52-0c5b-4c1e-9a57-2d0f3c9b1a7e"
NAMES = ("alpine", "library/alpine", "team/sub/app", "a/b/c/d")


def endpoints(name: str) -> list[tuple[str, RouteMatch]]:
    return [
        (f"/v2/{name}/tags/list", RouteMatch(RouteKind.TAGS, name)),
        (f"/v2/{name}/manifests/latest", RouteMatch(RouteKind.MANIFEST, name, "latest")),
        (f"/v2/{name}/manifests/{DIGEST}", RouteMatch(RouteKind.MANIFEST, name, DIGEST)),
        (f"/v2/{name}/blobs/{DIGEST}", RouteMatch(RouteKind.BLOB, name, DIGEST)),
        (f"/v2/{name}/blobs/uploads/", RouteMatch(RouteKind.UPLOAD_START, name)),
        (f"/v2/{name}/blobs/uploads", RouteMatch(RouteKind.UPLOAD_START, name)),
        (f"/v2/{name}/blobs/uploads/{SESSION}", RouteMatch(RouteKind.UPLOAD_SESSION, name, SESSION)),
        (f"/v2/{name}/referrers/{DIGEST}", RouteMatch(RouteKind.REFERRERS, name, DIGEST)),
    ]


ENDPOINT_CASES = [
    pytest.param(path, expected, id=f"{expected.kind.value}:{path}")
    for name in NAMES
    for path, expected in endpoints(name)
]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("/v2/", RouteMatch(RouteKind.BASE), id="base"),
        pytest.param("/v2", RouteMatch(RouteKind.BASE), id="base-without-slash"),
        pytest.param("/v2/_catalog", RouteMatch(RouteKind.CATALOG), id="catalog"),
        *ENDPOINT_CASES,
    ],
)
def test_every_registry_endpoint(path: str, expected: RouteMatch) -> None:
    assert match_route(path) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("/v2/a/../b/blobs/uploads/", RouteMatch(RouteKind.UPLOAD_START, "b"), id="dotdot-to-upload-start"),
        pytest.param("/v2/b/./blobs/uploads/", RouteMatch(RouteKind.UPLOAD_START, "b"), id="dot-segment"),
        pytest.param("/v2//b//blobs/uploads//", RouteMatch(RouteKind.UPLOAD_START, "b"), id="double-slashes"),
        pytest.param("//v2/b/blobs/uploads/", RouteMatch(RouteKind.UPLOAD_START, "b"), id="leading-double-slash"),
        pytest.param("///v2/b/blobs/uploads/", RouteMatch(RouteKind.UPLOAD_START, "b"), id="leading-triple-slash"),
        pytest.param("/../../v2/b/blobs/uploads/", RouteMatch(RouteKind.UPLOAD_START, "b"), id="dotdot-above-root"),
        pytest.param(f"/v2/b/blobs/uploads/x/../{SESSION}", RouteMatch(RouteKind.UPLOAD_SESSION, "b", SESSION),
                     id="dotdot-to-upload-session"),
        pytest.param(f"/v2/team/x/../app/blobs/{DIGEST}", RouteMatch(RouteKind.BLOB, "team/app", DIGEST),
                     id="dotdot-inside-name"),
        pytest.param("/v2/team/app/manifests/../manifests/v1", RouteMatch(RouteKind.MANIFEST, "team/app", "v1"),
                     id="dotdot-after-name"),
        pytest.param(f"/v2/b/blobs/uploads/{SESSION}/.", RouteMatch(RouteKind.UPLOAD_SESSION, "b", SESSION),
                     id="trailing-dot"),
        pytest.param("/v2/b/blobs/uploads/.", RouteMatch(RouteKind.UPLOAD_START, "b"), id="trailing-dot-upload-start"),
        pytest.param("/v2/x/..", RouteMatch(RouteKind.BASE), id="dotdot-to-base"),
        pytest.param("/v2/./_catalog", RouteMatch(RouteKind.CATALOG), id="dot-to-catalog"),
    ],
)
def test_paths_are_cleaned_before_matching(path: str, expected: RouteMatch) -> None:
    assert match_route(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/", id="root"),
        pytest.param("", id="empty"),
        pytest.param("/v1/", id="v1"),
        pytest.param("/v2x", id="v2-prefix"),
        pytest.param("/metrics", id="metrics"),
        pytest.param("/v2/app", id="name-only"),
        pytest.param("/v2/app/manifests/", id="manifest-without-reference"),
        pytest.param("/v2/app/manifests/a/b", id="manifest-reference-with-slash"),
        pytest.param(f"/v2/app/blobs/{DIGEST}/", id="blob-trailing-slash"),
        pytest.param(f"/v2/app/blobs/uploads/{SESSION}/", id="session-trailing-slash"),
        pytest.param("/v2/app/tags/list/", id="tags-trailing-slash"),
        pytest.param("/v2/app/tags", id="tags-without-list"),
        pytest.param("/v2/blobs/uploads/", id="upload-start-without-name"),
        pytest.param("v2/app/blobs/uploads/", id="relative-path"),
        pytest.param("/v2/app/../../../blobs/uploads/", id="dotdot-out-of-v2"),
    ],
)
def test_other_paths(path: str) -> None:
    assert match_route(path) == RouteMatch(RouteKind.OTHER)


@pytest.mark.parametrize(
    ("path", "cleaned"),
    [
        pytest.param("/v2/", "/v2/", id="keeps-trailing-slash"),
        pytest.param("/v2", "/v2", id="adds-no-slash"),
        pytest.param("/", "/", id="root"),
        pytest.param("//", "/", id="double-slash-root"),
        pytest.param("/..", "/", id="dotdot-at-root"),
        pytest.param("/../", "/", id="dotdot-at-root-with-slash"),
        pytest.param("//a//b/", "/a/b/", id="repeated-slashes"),
        pytest.param("/a/./b/../c", "/a/c", id="dot-segments"),
        pytest.param("/a/b/..", "/a", id="trailing-dotdot-has-no-slash"),
        pytest.param("/a/b/../", "/a/", id="trailing-dotdot-slash-keeps-slash"),
        pytest.param("/a/.../b", "/a/.../b", id="three-dots-is-a-name"),
        pytest.param("/a/..b/c", "/a/..b/c", id="dotdot-prefix-is-a-name"),
        pytest.param("a/../b", "a/../b", id="relative-untouched"),
    ],
)
def test_clean_path(path: str, cleaned: str) -> None:
    assert clean_path(path) == cleaned


def go_mux_clean(path: str) -> str:
    """Go's path.Clean for a rooted path, with the trailing slash put back as gorilla/mux does."""
    stack: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if stack:
                stack.pop()
            continue
        stack.append(segment)
    cleaned = "/" + "/".join(stack)
    if path.endswith("/") and cleaned != "/":
        cleaned += "/"
    return cleaned


@given(st.text(st.sampled_from("/.ab"), max_size=30).map(lambda text: "/" + text))
def test_clean_path_agrees_with_go(path: str) -> None:
    assert clean_path(path) == go_mux_clean(path)


# Properties over generated names ----------------------------------------------------------------------

alphanumerics = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789"), min_size=1, max_size=6)
separators = st.sampled_from([".", "_", "__", "-", "--"])
components = st.one_of(
    st.builds(lambda a, s, b: a + s + b, alphanumerics, separators, alphanumerics),
    alphanumerics,
    st.sampled_from(["blobs", "uploads", "manifests", "tags", "list", "referrers", "v2"]),
)
names = st.lists(components, min_size=1, max_size=4).map("/".join)
tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
digests = st.sampled_from(["sha256", "sha512"]).flatmap(
    lambda algorithm: st.text(st.sampled_from("0123456789abcdef"), min_size=64 if algorithm == "sha256" else 128,
                              max_size=64 if algorithm == "sha256" else 128).map(lambda hex_: f"{algorithm}:{hex_}")
)
sessions = st.uuids().map(str)


@st.composite
def generated_endpoints(draw: st.DrawFn) -> tuple[list[str], bool, RouteMatch]:
    """An endpoint as path segments, whether it ends in a slash, and what it means."""
    name = draw(names)
    kind = draw(st.sampled_from([k for k in RouteKind if k not in (RouteKind.OTHER,)]))
    if kind is RouteKind.BASE:
        return ["v2"], draw(st.booleans()), RouteMatch(kind)
    if kind is RouteKind.CATALOG:
        return ["v2", "_catalog"], False, RouteMatch(kind)
    name_segments = ["v2", *name.split("/")]
    if kind is RouteKind.TAGS:
        return [*name_segments, "tags", "list"], False, RouteMatch(kind, name)
    if kind is RouteKind.MANIFEST:
        reference = draw(st.one_of(tags, digests))
        return [*name_segments, "manifests", reference], False, RouteMatch(kind, name, reference)
    if kind is RouteKind.BLOB:
        reference = draw(digests)
        return [*name_segments, "blobs", reference], False, RouteMatch(kind, name, reference)
    if kind is RouteKind.UPLOAD_START:
        return [*name_segments, "blobs", "uploads"], draw(st.booleans()), RouteMatch(kind, name)
    if kind is RouteKind.UPLOAD_SESSION:
        reference = draw(sessions)
        return [*name_segments, "blobs", "uploads", reference], False, RouteMatch(kind, name, reference)
    reference = draw(digests)
    return [*name_segments, "referrers", reference], False, RouteMatch(kind, name, reference)


@given(generated_endpoints())
def test_every_endpoint_for_any_name(endpoint: tuple[list[str], bool, RouteMatch]) -> None:
    segments, trailing_slash, expected = endpoint
    path = "/" + "/".join(segments) + ("/" if trailing_slash else "")

    assert match_route(path) == expected


noise = st.sampled_from(["/", "//", "/./", "/x/../", "/./x/./../", "/.//"])


@given(generated_endpoints(), st.data())
def test_dot_segments_and_double_slashes_never_change_the_meaning(
    endpoint: tuple[list[str], bool, RouteMatch], data: st.DataObject
) -> None:
    segments, trailing_slash, expected = endpoint
    path = data.draw(noise)
    for segment in segments[:-1]:
        path += segment + data.draw(noise)
    path += segments[-1] + (data.draw(noise) if trailing_slash else "")

    assert match_route(path) == expected


# The route table as distribution's router reads it (regular expressions, as the gateway once matched them):
# the string tests of proxy/routes.py must read every path the same way.
REGEX_ROUTES = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        (RouteKind.BASE, r"/v2/?"),
        (RouteKind.CATALOG, r"/v2/_catalog"),
        (RouteKind.UPLOAD_START, r"/v2/(?P<name>.+)/blobs/uploads/?"),
        (RouteKind.UPLOAD_SESSION, r"/v2/(?P<name>.+)/blobs/uploads/(?P<reference>[^/]+)"),
        (RouteKind.BLOB, r"/v2/(?P<name>.+)/blobs/(?P<reference>[^/]+)"),
        (RouteKind.MANIFEST, r"/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)"),
        (RouteKind.TAGS, r"/v2/(?P<name>.+)/tags/list"),
        (RouteKind.REFERRERS, r"/v2/(?P<name>.+)/referrers/(?P<reference>[^/]+)"),
    )
)


def regex_route(path: str) -> RouteMatch:
    cleaned = clean_path(path)
    for kind, pattern in REGEX_ROUTES:
        found = pattern.fullmatch(cleaned)
        if found:
            return RouteMatch(kind, found.groupdict().get("name"), found.groupdict().get("reference"))
    return RouteMatch(RouteKind.OTHER)


path_parts = st.sampled_from(["v2", "blobs", "uploads", "manifests", "tags", "list", "referrers", "_catalog", "a",
                              "b c", "a\nb", "\n", "", ".", "..", "x.y"])  # fmt: skip


@given(st.lists(path_parts, max_size=8), st.booleans(), st.booleans())
def test_routes_read_every_path_as_the_regular_expressions_do(parts: list[str], rooted: bool, v2: bool) -> None:
    path = ("/v2/" if v2 else "/" if rooted else "") + "/".join(parts)
    assert match_route(path) == regex_route(path)


@pytest.mark.parametrize("path", ["/v2/a\nb/blobs/x", "/v2/a/blobs/x\ny", "/v2/\n/tags/list", "/v2/a/blobs/uploads/\n",
                                  "/v2/a/manifests/b/blobs/c", "/v2/blobs/uploads/x"])  # fmt: skip
def test_newlines_and_markers_inside_names(path: str) -> None:
    assert match_route(path) == regex_route(path)
