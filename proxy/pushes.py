"""How the registry reads a push: every (route, method) through which a request names a blob to commit or
mount, and the fields it names it by, read as CNCF distribution (2.8 and 3.x) reads them, with Go's
net/http `Request.FormValue` (the form body's values, then the query's; the first value of a field),
`url.ParseQuery`, `mime.ParseMediaType` and go-digest's `Parse`. No I/O.

Not rows, because distribution commits nothing through them: `PUT` on the start URL (the handler has no
upload: BLOB_UPLOAD_UNKNOWN), `digest` on a `POST` to a session URL (StartBlobUpload reads only
`mount`/`from`), and `PATCH` (it appends bytes; its form fields, `_state` included, name no blob).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from proxy.routes import RouteKind


class Field(StrEnum):
    DIGEST = "digest"
    MOUNT = "mount"
    FROM = "from"


@dataclass(frozen=True, slots=True)
class CommitRow:
    """One way of naming a blob: on `kind` with `method`, the value of `field` is the blob the registry commits
    (or mounts); with `requires`, only when that field is not empty too."""

    kind: RouteKind
    method: str
    field: Field
    requires: Field | None
    reader: str


COMMIT_ROWS: tuple[CommitRow, ...] = (
    CommitRow(
        RouteKind.UPLOAD_START, "POST", Field.MOUNT, Field.FROM,
        "route blob-upload /v2/{name}/blobs/uploads/; blobUploadDispatcher -> StartBlobUpload: "
        'r.FormValue("mount"), r.FormValue("from"), both non-empty, digest.Parse -> mount (handlers/blobupload.go)',
    ),
    CommitRow(
        RouteKind.UPLOAD_SESSION, "POST", Field.MOUNT, Field.FROM,
        "route blob-upload-chunk /v2/{name}/blobs/uploads/{uuid}, registered to the same blobUploadDispatcher "
        '(handlers/app.go): the session is resumed from r.FormValue("_state"), then POST -> StartBlobUpload, '
        "which mounts as on the start URL",
    ),
    CommitRow(
        RouteKind.UPLOAD_SESSION, "PUT", Field.DIGEST, None,
        'route blob-upload-chunk; PUT -> PutBlobUploadComplete: r.FormValue("digest"), digest.Parse, '
        "Upload.Commit (handlers/blobupload.go)",
    ),
    CommitRow(
        RouteKind.UPLOAD_START, "POST", Field.DIGEST, None,
        "OCI distribution-spec monolithic POST /v2/{name}/blobs/uploads/?digest= with the blob as body: other "
        "registries commit it; distribution 2.8/3.x ignores digest there and opens a session",
    ),
)  # fmt: skip


# The rows of each (route, method), looked up once per request rather than scanned.
ROWS_BY_ROUTE: dict[tuple[RouteKind, str], tuple[CommitRow, ...]] = {
    (row.kind, row.method): tuple(other for other in COMMIT_ROWS if (other.kind, other.method) == (row.kind, row.method))
    for row in COMMIT_ROWS
}


def rows_for(kind: RouteKind, method: str) -> tuple[CommitRow, ...]:
    return ROWS_BY_ROUTE.get((kind, method), ())


def names_blobs(kind: RouteKind, method: str) -> bool:
    """Whether a request on this route with this method can name a blob for the registry to commit."""
    return (kind, method) in ROWS_BY_ROUTE


# Go's strings ---------------------------------------------------------------------------------------------

# unicode.IsSpace: Python's str.isspace() also counts U+001C..U+001F, Go does not.
GO_SPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
                     "\u200a\u2028\u2029\u202f\u205f\u3000")  # fmt: skip
# unicode.ToLower is the simple case mapping; Python's str.lower() is the full one, which differs only here.
GO_LOWER_EXCEPTIONS = {"\u0130": "i"}


def go_string(raw: bytes) -> str:
    """Bytes as Go's range over a string sees them: every byte that is not valid UTF-8 is one U+FFFD."""
    text = raw.decode("utf-8", "surrogateescape")
    return "".join("\ufffd" if "\udc80" <= character <= "\udcff" else character for character in text)


def go_to_lower(text: str) -> str:
    """strings.ToLower: each character by itself, by its simple lower-case mapping."""
    if text.isascii():
        return text.lower()
    return "".join(GO_LOWER_EXCEPTIONS.get(character) or character.lower() for character in text)


def go_trim_space(text: str) -> str:
    start, end = 0, len(text)
    while start < end and text[start] in GO_SPACE:
        start += 1
    while end > start and text[end - 1] in GO_SPACE:
        end -= 1
    return text[start:end]


# Form bodies ----------------------------------------------------------------------------------------------

URLENCODED = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
# ParseForm reads an urlencoded body only for these; ParseMultipartForm reads a multipart one for any method.
URLENCODED_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
MEDIA_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:/[!#$%&'*+\-.^_`|~0-9A-Za-z]+)?")


def go_media_type(value: bytes) -> str:
    """mime.ParseMediaType's media type: the part before `;`, lower-cased and trimmed the Go way, or "" when it is
    not `token[/token]`. Its parameters can only make Go *not* read a form (a duplicate name, a multipart type
    without boundary), so they are not looked at: the gateway refuses a superset of what Go parses."""
    base = go_string(value).split(";", 1)[0]
    media_type = go_trim_space(go_to_lower(base))
    return media_type if MEDIA_TOKEN.fullmatch(media_type) else ""


def form_body_refusal(method: str, content_types: Iterable[bytes]) -> str | None:
    """Why the registry could read this request's body as a form (and so find `digest`, `mount` or `from` in it),
    or None. `content_types` are the raw values of every Content-Type header (Go reads the first; all count)."""
    for value in content_types:
        if not value.isascii():
            return "a Content-Type with non-ASCII bytes"
        media_type = go_media_type(value)
        if media_type == MULTIPART or (media_type == URLENCODED and method in URLENCODED_BODY_METHODS):
            return f"a {media_type} body"
    return None


# Queries --------------------------------------------------------------------------------------------------

HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


def go_query_unescape(raw: str) -> str | None:
    """url.QueryUnescape: `+` is a space, `%XX` a byte; None (Go's error) for a malformed escape."""
    data = raw.encode("utf-8", "surrogateescape")
    out = bytearray()
    index = 0
    while index < len(data):
        byte = data[index]
        if byte == 0x25:
            pair = data[index + 1 : index + 3]
            if len(pair) < 2 or not all(digit in HEX_DIGITS for digit in pair):
                return None
            out.append(int(pair, 16))
            index += 3
        else:
            out.append(0x20 if byte == 0x2B else byte)
            index += 1
    return out.decode("utf-8", "surrogateescape")


def upstream_query(target: str) -> str:
    """The raw query of a request target as the gateway forwards it: yarl takes `#...` as a fragment and the
    upstream request never carries it."""
    return target.partition("#")[0].partition("?")[2]


def go_parse_query(raw_query: str) -> list[tuple[str, str]]:
    """url.ParseQuery as of Go 1.17 (distribution 2.8.2 is built with 1.19): pairs split on `&` only, a pair
    holding `;` is dropped, and so is one with a malformed escape; the order is kept."""
    pairs: list[tuple[str, str]] = []
    for item in raw_query.split("&"):
        if not item or ";" in item:
            continue
        key, _, value = item.partition("=")
        decoded_key, decoded_value = go_query_unescape(key), go_query_unescape(value)
        if decoded_key is not None and decoded_value is not None:
            pairs.append((decoded_key, decoded_value))
    return pairs


def form_value(name: str, query: Sequence[tuple[str, str]], body: Sequence[tuple[str, str]] = ()) -> str:
    """Request.FormValue: the first value of `name`, the body's before the query's; "" when there is none."""
    for key, value in (*body, *query):
        if key == name:
            return value
    return ""


# Digests --------------------------------------------------------------------------------------------------

# go-digest's Parse, with the algorithms distribution links in: lower-case hex of the exact length.
REGISTRY_DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}")


def registry_parses_digest(digest: str) -> bool:
    return REGISTRY_DIGEST.fullmatch(digest) is not None


# One push -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NamedBlob:
    row: CommitRow
    digest: str


@dataclass(frozen=True, slots=True)
class PushReading:
    """The blobs a request names for commit, as the registry reads its query; `ambiguous` says why servers
    that read queries otherwise (older Go, other frameworks) could find another blob in it."""

    named: tuple[NamedBlob, ...] = ()
    ambiguous: str | None = None

    @property
    def digests(self) -> list[str]:
        return [blob.digest for blob in self.named]


def read_push(kind: RouteKind, method: str, target: str) -> PushReading:
    """What a request with this raw target names, by the rows of its route and method (its body is refused
    before this matters whenever the registry could read it as a form)."""
    rows = rows_for(kind, method)
    if not rows:
        return PushReading()
    raw_query = upstream_query(target)
    pairs = go_parse_query(raw_query)
    named = []
    for row in rows:
        digest = form_value(row.field, pairs)
        if digest and (row.requires is None or form_value(row.requires, pairs)):
            named.append(NamedBlob(row, digest))
    return PushReading(tuple(named), ambiguity(raw_query, pairs, rows))


def ambiguity(raw_query: str, pairs: Sequence[tuple[str, str]], rows: Sequence[CommitRow]) -> str | None:
    fields = {row.field for row in rows} | {row.requires for row in rows if row.requires}
    for item in raw_query.split("&"):
        if ";" in item and any(go_query_unescape(part.partition("=")[0]) in fields for part in item.split(";")):
            return f"a {'/'.join(sorted(fields))} field after a ';' (read by older servers, dropped by newer ones)"
    for name in sorted(fields):
        if len({value for key, value in pairs if key == name}) > 1:
            return f"more than one value of {name} (registries differ on which one they take)"
    return None


def split_field(target: str, name: str) -> tuple[str, list[str]]:
    """A raw request target without the query items the registry reads as `name` (however they are spelled),
    and those items, byte-for-byte."""
    path, question, query = target.partition("?")
    if not question:
        return target, []
    kept: list[str] = []
    taken: list[str] = []
    for item in query.split("&"):
        (taken if go_query_unescape(item.partition("=")[0]) == name else kept).append(item)
    return (f"{path}?{'&'.join(kept)}" if kept else path), taken
