"""The registry's reading of a push is the gateway's: proxy.pushes' table of the routes, methods and fields through
which a request names a blob to commit or mount, Go's FormValue and ParseMediaType as the registry applies them,
and, per row, proof in a real registry's storage that a known foreign blob is neither committed nor mounted.
"""

from __future__ import annotations

import os
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.fixtures import GatewayFactory, gateway_knowing
from support.images import Image, build_image
from support.protocol import (
    Answer,
    absolute,
    call,
    digest_of,
    push_single_put,
    start_upload,
)
from support.registry import Registry
from yarl import URL

from proxy.pushes import (
    COMMIT_ROWS,
    CommitRow,
    Field,
    form_body_refusal,
    form_value,
    go_media_type,
    go_parse_query,
    go_to_lower,
    go_trim_space,
    names_blobs,
    read_push,
    registry_parses_digest,
    upstream_query,
)
from proxy.routes import RouteKind

D = "sha256:" + "d" * 64
START = "/v2/team/app/blobs/uploads/"
SESSION = "/v2/team/app/blobs/uploads/0b4a-uuid?_state=abc%3D"
HYPOTHESIS = settings(derandomize=True, database=None, max_examples=150, deadline=None)

# The pure table ------------------------------------------------------------------------------------------


def test_the_table_has_exactly_the_rows_read_from_distributions_handlers() -> None:
    rows = {(row.kind, row.method, row.field, row.requires) for row in COMMIT_ROWS}
    assert rows == {
        (RouteKind.UPLOAD_START, "POST", Field.MOUNT, Field.FROM),
        (RouteKind.UPLOAD_SESSION, "POST", Field.MOUNT, Field.FROM),
        (RouteKind.UPLOAD_SESSION, "PUT", Field.DIGEST, None),
        (RouteKind.UPLOAD_START, "POST", Field.DIGEST, None),
    }
    assert all(row.reader for row in COMMIT_ROWS)


ROW_TARGETS = {
    (RouteKind.UPLOAD_START, "POST", Field.MOUNT): f"{START}?mount={D}&from=seed/repo",
    (RouteKind.UPLOAD_SESSION, "POST", Field.MOUNT): f"{SESSION}&mount={D}&from=seed/repo",
    (RouteKind.UPLOAD_SESSION, "PUT", Field.DIGEST): f"{SESSION}&digest={D}",
    (RouteKind.UPLOAD_START, "POST", Field.DIGEST): f"{START}?digest={D}",
}


@pytest.mark.parametrize("row", COMMIT_ROWS, ids=lambda row: f"{row.kind}-{row.method}-{row.field}")
def test_each_row_names_its_blob_and_nothing_else_does(row: CommitRow) -> None:
    kind, method, field = row.kind, row.method, row.field
    target = ROW_TARGETS[(kind, method, field)]
    assert [blob.row for blob in read_push(kind, method, target).named] == [row]
    assert read_push(kind, method, target).digests == [D]
    for other in ("GET", "HEAD", "PATCH", "DELETE", "PUT", "POST"):
        if not names_blobs(kind, other):
            assert read_push(kind, other, target).digests == []
    if row.requires is not None:
        assert read_push(kind, method, target.replace("&from=seed/repo", "")).digests == []
        assert read_push(kind, method, target.replace("from=seed/repo", "from=")).digests == []


def test_routes_that_commit_nothing_in_distribution_name_nothing() -> None:
    assert not names_blobs(RouteKind.UPLOAD_START, "PUT")  # no upload: BLOB_UPLOAD_UNKNOWN
    assert read_push(RouteKind.UPLOAD_SESSION, "POST", f"{SESSION}&digest={D}").digests == []
    assert not names_blobs(RouteKind.UPLOAD_SESSION, "PATCH")
    assert not names_blobs(RouteKind.BLOB, "PUT") and not names_blobs(RouteKind.MANIFEST, "PUT")


QUERIES = {
    # raw query -> the `digest` FormValue reads
    f"digest={D}": D,
    f"digest={D}&digest=sha256:{'0' * 64}": D,  # the first value
    f"digest=sha256%3A{'d' * 64}": D,
    f"digest=sha256%3a{'d' * 64}": D,
    f"%64igest={D}": D,
    f"&&digest={D}&&": D,
    f"x=1;digest={D}": "",  # a pair holding `;` is dropped (Go 1.17+)
    f"digest={D};x=1": "",
    f"digest={D}&x=%zz": D,  # a malformed escape drops only its own pair
    f"digest={D}%zz": "",
    f"Digest={D}": "",
    f"digest=+{D}": f" {D}",
    "digest=a%2Bb+c": "a+b c",
    "digest": "",
    f"=x&digest={D}": D,
    f"digest=%FF{D}": "\udcff" + D,
}


@pytest.mark.parametrize("raw_query", QUERIES)
def test_form_value_reads_a_query_as_go_does(raw_query: str) -> None:
    assert form_value("digest", go_parse_query(raw_query)) == QUERIES[raw_query]


def test_form_value_takes_the_bodys_values_before_the_querys() -> None:
    assert form_value("digest", [("digest", "query")], [("digest", "body")]) == "body"
    assert form_value("digest", [("digest", "query")], [("mount", "body")]) == "query"


def test_the_gateway_reads_the_query_the_upstream_receives() -> None:
    assert upstream_query(f"/v2/a/blobs/uploads/u?_state=x#&digest={D}") == "_state=x"
    assert upstream_query(f"/v2/a/blobs/uploads/u#x?digest={D}") == ""
    assert read_push(RouteKind.UPLOAD_SESSION, "PUT", f"{SESSION}#&digest={D}").digests == []


AMBIGUOUS = [
    f"{SESSION}&digest={D}&digest=sha256:{'0' * 64}",
    f"{SESSION}&digest=sha256:{'0' * 64}&digest={D}",
    f"{SESSION}&x=1;digest={D}",
    f"{SESSION}&x=1;%64igest={D}",
]


@pytest.mark.parametrize("target", AMBIGUOUS)
def test_pushes_other_servers_could_read_otherwise_are_ambiguous(target: str) -> None:
    assert read_push(RouteKind.UPLOAD_SESSION, "PUT", target).ambiguous


@pytest.mark.parametrize("target", [f"{SESSION}&digest={D}&digest={D}", f"{SESSION}&x=1;y=2&digest={D}"])
def test_repeating_the_same_value_or_other_semicolons_is_not_ambiguous(target: str) -> None:
    assert read_push(RouteKind.UPLOAD_SESSION, "PUT", target).ambiguous is None


DIGESTS = {
    D: True,
    "sha512:" + "a" * 128: True,
    "sha384:" + "a" * 96: True,
    "sha256:" + "D" * 64: False,
    "SHA256:" + "d" * 64: False,
    "sha256:" + "d" * 63: False,
    D + "\n": False,
    "sha512:" + "d" * 64: False,
    "md5:" + "d" * 32: False,
}


@pytest.mark.parametrize("digest", DIGESTS)
def test_digests_are_parsed_as_go_digest_does(digest: str) -> None:
    assert registry_parses_digest(digest) is DIGESTS[digest]


LOWER = {
    "APPLICATION/X-WWW-FORM-URLENCODED": "application/x-www-form-urlencoded",
    "appl\u0130cation": "application",  # Python: "appli\u0307cation"
    "\u212a": "k",  # KELVIN SIGN
    "\u03a3\u03a3": "\u03c3\u03c3",  # Go has no final sigma
    "\u1e9e": "\u00df",
    "\ufffd": "\ufffd",
}


@pytest.mark.parametrize("text", LOWER)
def test_go_to_lower_is_the_simple_case_mapping(text: str) -> None:
    assert go_to_lower(text) == LOWER[text]


def test_python_and_go_lower_case_differ_on_dotted_capital_i() -> None:
    assert "appl\u0130cation".lower() != "application" == go_to_lower("appl\u0130cation")


@given(st.text())
@HYPOTHESIS
def test_go_to_lower_maps_each_character_to_one(text: str) -> None:
    lowered = go_to_lower(text)
    assert len(lowered) == len(text)
    assert all(c.lower() == l or c == "\u0130" for c, l in zip(text, lowered, strict=True))


def test_go_trims_fewer_characters_than_python() -> None:
    assert go_trim_space("\x1c a \t\r\n") == "\x1c a"
    assert "\x1c a ".strip() == "a"


CONTENT_TYPES: dict[tuple[str, bytes], str | None] = {
    ("PUT", b"application/x-www-form-urlencoded"): "a application/x-www-form-urlencoded body",
    ("POST", b" Application/X-WWW-Form-UrlEncoded ; charset=utf-8"): "a application/x-www-form-urlencoded body",
    ("PATCH", b"application/x-www-form-urlencoded;;"): "a application/x-www-form-urlencoded body",
    ("PUT", b"application/x-www-form-urlencoded; =garbage"): "a application/x-www-form-urlencoded body",
    ("DELETE", b"application/x-www-form-urlencoded"): None,  # ParseForm reads bodies of POST, PUT, PATCH only
    ("GET", b"application/x-www-form-urlencoded"): None,
    ("DELETE", b"multipart/form-data; boundary=x"): "a multipart/form-data body",  # ParseMultipartForm: any method
    ("PUT", b"MULTIPART/FORM-DATA; boundary=x"): "a multipart/form-data body",
    ("PUT", "appl\u0130cation/x-www-form-urlencoded".encode()): "a Content-Type with non-ASCII bytes",
    ("PUT", "application/octet-stream; x=\u00e9".encode()): "a Content-Type with non-ASCII bytes",
    ("PUT", b"application/x-www-form-urlencoded\xff"): "a Content-Type with non-ASCII bytes",
    ("PUT", b"application/octet-stream"): None,
    ("PUT", b""): None,
    ("PUT", b"\x1capplication/x-www-form-urlencoded"): None,  # not Go space: no media type
    ("PUT", b"application/x-www-form-urlencoded/x"): None,
    ("PUT", b"application/x-www-form-urlencoded, text/plain"): None,
    ("PUT", b"text/x-www-form-urlencoded"): None,
}


@pytest.mark.parametrize(("method", "content_type"), CONTENT_TYPES)
def test_a_body_is_a_form_where_go_parses_one(method: str, content_type: bytes) -> None:
    assert form_body_refusal(method, [content_type]) == CONTENT_TYPES[(method, content_type)]


def test_every_content_type_header_counts() -> None:
    assert form_body_refusal("PUT", [b"application/octet-stream", b"multipart/form-data; boundary=b"])


def go_oracle_is_form(method: str, value: str) -> bool:
    """For ASCII values: Go lower-cases as Python does and trims only these six."""
    media_type = value.split(";", 1)[0].lower().strip("\t\n\v\f\r ")
    return media_type == "multipart/form-data" or (
        media_type == "application/x-www-form-urlencoded" and method in {"POST", "PUT", "PATCH"}
    )


def mixed_case(draw: st.DrawFn, text: str) -> str:
    return "".join(c.upper() if draw(st.booleans()) else c for c in text)


@st.composite
def content_types(draw: st.DrawFn) -> str:
    base = draw(st.sampled_from(["application/x-www-form-urlencoded", "multipart/form-data", "application/octet-stream",
                                 "application/x-www-form-urlencode", "multipart/form-datas"]))  # fmt: skip
    space = st.text(alphabet="\t\n\v\f\r \x1c\x1f", max_size=3)
    params = st.text(alphabet=string.ascii_letters + "=;\" \t/", max_size=12)
    return f"{draw(space)}{mixed_case(draw, base)}{draw(space)}{draw(st.sampled_from(['', ';']))}{draw(params)}"


@given(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]), content_types())
@HYPOTHESIS
def test_ascii_content_types_are_forms_exactly_where_go_finds_one(method: str, value: str) -> None:
    assert (form_body_refusal(method, [value.encode()]) is not None) == go_oracle_is_form(method, value)


@given(st.text(min_size=1).filter(lambda text: not text.isascii()), st.sampled_from(["POST", "PUT"]))
@HYPOTHESIS
def test_any_non_ascii_content_type_of_a_push_is_refused(value: str, method: str) -> None:
    assert form_body_refusal(method, [value.encode("utf-8", "surrogatepass")]) is not None


@given(st.text(alphabet="i\u0130aApplcton/xwfrmuedsA-Z", max_size=40))
@HYPOTHESIS
def test_go_media_type_lower_cases_dotted_capital_i_to_i(text: str) -> None:
    expected = text.replace("\u0130", "i").lower().split(";", 1)[0].strip()
    assert go_media_type(text.encode()) in {expected, ""}
    if "\u0130" in text:
        assert form_body_refusal("PUT", [text.encode()]) is not None


QUERY_TEXT = st.text(alphabet=string.ascii_letters + string.digits + ":/=&;+%# \u00e9", max_size=12)


@st.composite
def encoded(draw: st.DrawFn, text: str) -> str:
    """`text` as a query component: every character that needs it percent-encoded, any other one maybe."""
    out = []
    for byte in text.encode():
        character = chr(byte)
        if character in "&;+%# =" or byte >= 0x80 or draw(st.booleans()):
            out.append(f"%{byte:02{draw(st.sampled_from('xX'))}}")
        else:
            out.append(character)
    return "".join(out)


@given(st.lists(st.tuples(QUERY_TEXT, QUERY_TEXT), max_size=5), st.data())
@settings(HYPOTHESIS, max_examples=60)
def test_go_parse_query_decodes_what_any_client_encodes(pairs: list[tuple[str, str]], data: st.DataObject) -> None:
    raw = "&".join(f"{data.draw(encoded(key))}={data.draw(encoded(value))}" for key, value in pairs)
    assert go_parse_query(raw) == pairs
    for key, _ in pairs:
        assert form_value(key, go_parse_query(raw)) == next(value for name, value in pairs if name == key)


# Against the real registry, per row ------------------------------------------------------------------------

UNICODE_FORM = "appl\u0130cation/x-www-form-urlencoded"
UNICODE_MULTIPART = "mult\u0130part/form-data; boundary=pushes-boundary"
SOURCE = "seed/repo"

Push = Callable[[aiohttp.ClientSession, str, str, str], Awaitable[Answer]]


def multipart(fields: dict[str, str]) -> bytes:
    parts = [f'--pushes-boundary\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
             for name, value in fields.items()]  # fmt: skip
    return ("".join(parts) + "--pushes-boundary--\r\n").encode()


async def session_url(http: aiohttp.ClientSession, base: str, repository: str) -> URL:
    return await start_upload(http, base, repository)


async def session_post_mount_query(http: aiohttp.ClientSession, base: str, repository: str, digest: str) -> Answer:
    location = await session_url(http, base, repository)
    return await call(http, "POST", URL(f"{location}&mount={digest}&from={SOURCE}", encoded=True))


async def session_post_mount_form(http: aiohttp.ClientSession, base: str, repository: str, digest: str) -> Answer:
    location = await session_url(http, base, repository)
    return await call(http, "POST", location, data=f"mount={digest}&from={SOURCE}".encode(),
                      headers={"Content-Type": UNICODE_FORM})  # fmt: skip


async def session_post_mount_multipart(
    http: aiohttp.ClientSession, base: str, repository: str, digest: str
) -> Answer:
    location = await session_url(http, base, repository)
    return await call(http, "POST", location, data=multipart({"mount": digest, "from": SOURCE}),
                      headers={"Content-Type": UNICODE_MULTIPART})  # fmt: skip


async def start_post_mount_query(http: aiohttp.ClientSession, base: str, repository: str, digest: str) -> Answer:
    return await call(http, "POST", URL(f"{base}/v2/{repository}/blobs/uploads/?mount={digest}&from={SOURCE}"))


async def start_post_mount_form(http: aiohttp.ClientSession, base: str, repository: str, digest: str) -> Answer:
    return await call(http, "POST", f"{base}/v2/{repository}/blobs/uploads/",
                      data=f"mount={digest}&from={SOURCE}".encode(), headers={"Content-Type": UNICODE_FORM})  # fmt: skip


def upload_then_put(body: Callable[[str], bytes], content_type: str) -> Callable[[bytes], Push]:
    """The blob in a PATCH, then a PUT that names its digest in a body of `content_type`, not in the query."""

    def with_data(data: bytes) -> Push:
        async def push(http: aiohttp.ClientSession, base: str, repository: str, digest: str) -> Answer:
            location = await session_url(http, base, repository)
            patched = await call(http, "PATCH", location, data=data, headers={"Content-Type": "application/octet-stream"})
            assert patched.status == 202, patched
            return await call(http, "PUT", absolute(base, patched.headers["Location"]), data=body(digest),
                              headers={"Content-Type": content_type})  # fmt: skip

        return push

    return with_data


def single_put_query(data: bytes) -> Push:
    async def push(http: aiohttp.ClientSession, base: str, repository: str, digest: str) -> Answer:
        location = await session_url(http, base, repository)
        target = URL(f"{location}&%64igest={digest.replace(':', '%3A')}", encoded=True)
        return await call(http, "PUT", target, data=data, headers={"Content-Type": "application/octet-stream"})

    return push


def monolithic_post(data: bytes) -> Push:
    async def push(http: aiohttp.ClientSession, base: str, repository: str, digest: str) -> Answer:
        return await call(http, "POST", URL(f"{base}/v2/{repository}/blobs/uploads/").with_query(digest=digest),
                          data=data, headers={"Content-Type": "application/octet-stream"})  # fmt: skip

    return push


@dataclass(frozen=True)
class Case:
    row: tuple[RouteKind, str, Field]
    mount: Push | None = None  # names a blob the source repository holds
    upload: Callable[[bytes], Push] | None = None  # names the blob it sends
    registry_commits: bool = True  # distribution itself commits through this form
    form_body: bool = False


SESSION_POST_MOUNT = (RouteKind.UPLOAD_SESSION, "POST", Field.MOUNT)
START_POST_MOUNT = (RouteKind.UPLOAD_START, "POST", Field.MOUNT)
SESSION_PUT_DIGEST = (RouteKind.UPLOAD_SESSION, "PUT", Field.DIGEST)
START_POST_DIGEST = (RouteKind.UPLOAD_START, "POST", Field.DIGEST)

CASES = {
    "session-post-mount-in-query": Case(SESSION_POST_MOUNT, mount=session_post_mount_query),
    "session-post-mount-in-unicode-form-body": Case(SESSION_POST_MOUNT, mount=session_post_mount_form, form_body=True),
    "session-post-mount-in-unicode-multipart-body": Case(
        SESSION_POST_MOUNT, mount=session_post_mount_multipart, form_body=True
    ),
    "start-post-mount-in-query": Case(START_POST_MOUNT, mount=start_post_mount_query),
    "start-post-mount-in-unicode-form-body": Case(START_POST_MOUNT, mount=start_post_mount_form, form_body=True),
    "session-put-digest-in-encoded-query": Case(SESSION_PUT_DIGEST, upload=single_put_query),
    "session-put-digest-in-unicode-form-body": Case(
        SESSION_PUT_DIGEST, upload=upload_then_put(lambda digest: f"digest={digest}".encode(), UNICODE_FORM),
        form_body=True,
    ),
    "session-put-digest-in-unicode-multipart-body": Case(
        SESSION_PUT_DIGEST, upload=upload_then_put(lambda digest: multipart({"digest": digest}), UNICODE_MULTIPART),
        form_body=True,
    ),
    "start-post-digest-monolithic": Case(START_POST_DIGEST, upload=monolithic_post, registry_commits=False),
}


def test_every_row_has_an_integration_case() -> None:
    assert {case.row for case in CASES.values()} == {(row.kind, row.method, row.field) for row in COMMIT_ROWS}



@pytest.fixture(scope="module")
def registry(module_registry: Registry) -> Registry:
    return module_registry

@pytest.fixture(scope="module")
def pushes_image() -> Image:
    return build_image(1101, layer_sizes=(6_000, 5_000, 4_000), foreign=2, os="windows")


@pytest.mark.parametrize("action", ["drop", "reject"])
@pytest.mark.parametrize("name", CASES)
async def test_no_row_commits_a_known_foreign_blob(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, pushes_image: Image,
    name: str, action: str,
) -> None:  # fmt: skip
    case = CASES[name]
    control = os.urandom(3000)
    if case.mount is not None:
        seeded = await push_single_put(http, registry.url, SOURCE, control)
        assert seeded.status == 201, seeded
        await case.mount(http, registry.url, f"control/{name}", digest_of(control))
    else:
        assert case.upload is not None
        await case.upload(control)(http, registry.url, f"control/{name}", digest_of(control))
    assert registry.links(f"control/{name}", digest_of(control)) is case.registry_commits, "the registry changed"

    gateway = await gateway_knowing(gateway_factory, registry, http, pushes_image, action, seed_for_mount=True)
    mounted, uploaded = pushes_image.foreign_layers  # the first sits in seed/repo; the second nowhere
    repository = f"{action}/{name}"
    if case.mount is not None:
        foreign = mounted
        answer = await case.mount(http, gateway.url, repository, foreign.digest)
    else:
        assert case.upload is not None
        foreign = uploaded
        answer = await case.upload(foreign.data)(http, gateway.url, repository, foreign.digest)

    assert not registry.links(repository, foreign.digest), f"committed; the gateway answered {answer}"
    assert not registry.blob_data_path(uploaded.digest).exists()
    if case.form_body:
        assert (answer.status, answer.error_codes) == (400, ["UNSUPPORTED"]), answer
    elif action == "reject":
        assert (answer.status, answer.error_codes) == (403, ["DENIED"]), answer
    else:
        assert (answer.status, answer.headers["Docker-Content-Digest"]) == (201, foreign.digest), answer
    probe = await call(http, "GET", f"{gateway.url}/v2/")
    assert probe.status == 200
