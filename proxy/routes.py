"""The registry API's routes as data, and what one request path means to the gateway."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from enum import StrEnum


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
    kind: RouteKind
    pattern: re.Pattern[str]


# Names are matched loosely on purpose: the upstream judges a name's validity, the gateway only
# needs to find the repository and digest of every push, whatever the name looks like.
ROUTES: tuple[Route, ...] = tuple(
    Route(kind, re.compile(pattern))
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


@dataclass(frozen=True, slots=True)
class RouteMatch:
    kind: RouteKind
    repository: str | None = None
    reference: str | None = None


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
    """Classify a decoded request path."""
    cleaned = clean_path(path)
    for route in ROUTES:
        found = route.pattern.fullmatch(cleaned)
        if found:
            groups = found.groupdict()
            return RouteMatch(route.kind, groups.get("name"), groups.get("reference"))
    return RouteMatch(RouteKind.OTHER)


def with_query_items(target: str, items: list[str]) -> str:
    if not items:
        return target
    return f"{target}{'&' if '?' in target else '?'}{'&'.join(items)}"
