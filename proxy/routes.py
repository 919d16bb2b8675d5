"""The registry API's routes as data, and what one request path means to the gateway."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple


class RouteKind(StrEnum):
    BASE = "base"
    CATALOG = "catalog"
    TAGS = "tags"
    MANIFEST = "manifest"
    BLOB = "blob"
    UPLOAD_START = "upload-start"
    UPLOAD_SESSION = "upload-session"
    REFERRERS = "referrers"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Route:
    """`/v2/<name><marker>`, then with `reference` one more segment, `/<reference>`; without, an optional
    `/` when `trailing_slash`. A name is one or more characters, slashes included, but no newline."""

    kind: RouteKind
    marker: str
    reference: bool
    trailing_slash: bool = False

    def match(self, path: str, parent: str, last: str) -> RouteMatch | None:
        """This route's reading of a cleaned path that starts with `/v2/` (`parent` and `last`: the path split
        at its last slash), or None."""
        reference: str | None = None
        if self.reference:
            if not last:
                return None
            head, reference = parent, last
        else:
            head = parent if self.trailing_slash and not last else path
        if not head.endswith(self.marker):
            return None
        name = head[len(NAME_PREFIX) : len(head) - len(self.marker)]
        if not name or "\n" in name:
            return None
        return RouteMatch(self.kind, name, reference)


# Names are matched loosely on purpose: the upstream judges a name's validity, the gateway only needs to find
# the repository and digest of every push, whatever the name looks like. Tried in this order; the name is the
# longest that fits (the reference is the last segment), as distribution's router (gorilla/mux) reads it.
NAME_PREFIX = "/v2/"
BASE_PATHS = frozenset({"/v2", "/v2/"})
CATALOG_PATH = "/v2/_catalog"
ROUTES: tuple[Route, ...] = (
    Route(RouteKind.UPLOAD_START, "/blobs/uploads", reference=False, trailing_slash=True),
    Route(RouteKind.UPLOAD_SESSION, "/blobs/uploads", reference=True),
    Route(RouteKind.BLOB, "/blobs", reference=True),
    Route(RouteKind.MANIFEST, "/manifests", reference=True),
    Route(RouteKind.TAGS, "/tags/list", reference=False),
    Route(RouteKind.REFERRERS, "/referrers", reference=True),
)


class RouteMatch(NamedTuple):
    """A named tuple rather than a frozen dataclass: made once per request, at a third of the cost."""

    kind: RouteKind
    repository: str | None = None
    reference: str | None = None


BASE = RouteMatch(RouteKind.BASE)
CATALOG = RouteMatch(RouteKind.CATALOG)
OTHER = RouteMatch(RouteKind.OTHER)


def clean_path(path: str) -> str:
    """The path as the upstream's router sees it: dot segments resolved, repeated slashes folded."""
    if not path.startswith("/") or ("//" not in path and "/." not in path):
        return path
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    if path.endswith("/") and cleaned != "/":
        cleaned += "/"
    return cleaned


def match_route(path: str) -> RouteMatch:
    """Classify a decoded request path: string tests on its ends, no regular expression."""
    cleaned = clean_path(path)
    if cleaned in BASE_PATHS:
        return BASE
    if cleaned == CATALOG_PATH:
        return CATALOG
    if cleaned.startswith(NAME_PREFIX):
        parent, _, last = cleaned.rpartition("/")
        for route in ROUTES:
            found = route.match(cleaned, parent, last)
            if found is not None:
                return found
    return OTHER


def with_query_items(target: str, items: list[str]) -> str:
    if not items:
        return target
    return f"{target}{'&' if '?' in target else '?'}{'&'.join(items)}"
