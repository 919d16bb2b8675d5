"""Fuzzing, bounded in count: request-target parsing and the push decision, the manifest reader, and raw HTTP
sent to a running gateway. The committed corpus (tests/corpus/: seeds and earlier findings) is replayed by
test_the_corpus_still_passes.

Runs are reproducible: hypothesis is derandomized (the same examples every run, so CI never fails by luck)
unless FUZZ_RANDOM=1 asks for a fresh search. A failing input is written to FUZZ_FINDINGS (default: a
folder under the system's temporary directory), never into the checkout: copy it into tests/corpus/ to
keep it.

Sizes: FUZZ_EXAMPLES (default 300) per pure property, FUZZ_WIRE_EXAMPLES (default 150) raw requests.

The push decision is checked against a model of how the registry (Go's net/url and FormValue) reads a
request target: percent-decoding the path, `&`-separated pairs, `+` as space, pairs holding `;` or a bad
escape dropped, the first value of a name winning. Bodies are outside this model: the registry's FormValue
also reads form bodies, which test_hardening covers against the real registry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.gateway import GatewayProcess
from support.images import build_image
from support.processes import require_binaries
from support.registry import Registry, RegistryConfig
from test_hardening import raw_exchange, status_of
from yarl import URL

from proxy.config import Settings
from proxy.forwarding import Upstream
from proxy.gateway import Gateway
from proxy.known import KnownForeign
from proxy.manifests import (
    FOREIGN_MEDIA_TYPES,
    ForeignClassifier,
    ForeignLayer,
    ManifestError,
    parse_manifest,
)
from proxy.metrics import Metrics
from proxy.policy import Policy, review_manifest
from proxy.routes import match_route
from proxy.store import MemoryStore

CORPUS = Path(__file__).with_name("corpus")
FOREIGN = "sha256:" + hashlib.sha256(b"a known foreign layer").hexdigest()
OTHER = "sha256:" + hashlib.sha256(b"an ordinary layer").hexdigest()
SESSION = "2c8f5a8e-4b1d-4f57-9a43-0e6f3d3b9c11"
# Bounded for CI; raise them for a deeper search (e.g. FUZZ_WIRE_EXAMPLES=5000 FUZZ_RANDOM=1).
WIRE_EXAMPLES = int(os.environ.get("FUZZ_WIRE_EXAMPLES", "150"))
PURE_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
DERANDOMIZE = os.environ.get("FUZZ_RANDOM") != "1"
FINDINGS = Path(os.environ.get("FUZZ_FINDINGS") or Path(tempfile.gettempdir()) / "foreign-layer-proxy-fuzz")


def save_failure(kind: str, entry: dict[str, Any], problem: str) -> Path:
    """Keep a failing input for replay (outside the checkout); the file name is derived from the input."""
    FINDINGS.mkdir(parents=True, exist_ok=True)
    document = {"kind": kind, **entry, "problem": problem[:500]}
    name = hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]
    path = FINDINGS / f"found-{kind}-{name}.json"
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def run_and_keep_failures(kind: str, check: Callable[[dict[str, Any]], str | None],
                          search: Callable[[Callable[[dict[str, Any]], None]], None]) -> None:  # fmt: skip
    """Run a hypothesis search whose examples are corpus entries; save the smallest failing one."""
    failures: list[tuple[dict[str, Any], str]] = []

    def example(entry: dict[str, Any]) -> None:
        problem = check(entry)
        if problem is not None:
            failures.append((entry, problem))
            raise AssertionError(f"{problem}\ninput: {json.dumps(entry)[:2000]}")

    try:
        search(example)
    except AssertionError as error:
        if failures:
            entry, problem = min(failures, key=lambda failure: len(json.dumps(failure[0])))
            raise AssertionError(f"{error}\nsaved as {save_failure(kind, entry, problem)}") from error
        raise


# Request targets and the push decision ------------------------------------------------------------


def go_query_unescape(text: str) -> str | None:
    """Go's url.QueryUnescape: `+` is a space, %XX a byte; None for a bad escape."""
    raw = text.encode("utf-8", "surrogateescape")
    out = bytearray()
    index = 0
    while index < len(raw):
        byte = raw[index]
        if byte == ord("%"):
            pair = raw[index + 1 : index + 3]
            if len(pair) < 2 or not all(chr(c) in "0123456789abcdefABCDEF" for c in pair):
                return None
            out.append(int(pair, 16))
            index += 3
        else:
            out.append(ord(" ") if byte == ord("+") else byte)
            index += 1
    return out.decode("utf-8", "surrogateescape")


def go_form_value(raw_query: str, name: str) -> str:
    """Go's Request.FormValue over the URL's query alone (url.ParseQuery, first value)."""
    for pair in raw_query.split("&"):
        if ";" in pair or not pair:
            continue
        key, _, value = pair.partition("=")
        key_text, value_text = go_query_unescape(key), go_query_unescape(value)
        if key_text is None or value_text is None:
            continue
        if key_text == name:
            return value_text
    return ""


def decision_gateway() -> Gateway:
    """The real Gateway with FOREIGN known; its decide() needs neither an upstream nor a loop."""
    known = KnownForeign(MemoryStore(), {FOREIGN: ForeignLayer(FOREIGN, next(iter(FOREIGN_MEDIA_TYPES)), 100)})
    upstream = Upstream(URL("http://upstream.invalid"), cast(Any, None))
    return Gateway(Settings(), upstream, known, Metrics(), cast(Any, None))


def gateway_decides(gateway: Gateway, method: str, target: str) -> bool:
    request = make_mocked_request(method, target)
    route = match_route(request.path)
    return gateway.decide(request, route) is not None


def registry_commits_foreign(method: str, target: str) -> bool:
    """Whether the registry would store or mount FOREIGN for this request (query only, path already canonical)."""
    _, _, query = target.partition("?")
    if method == "PUT":
        return go_form_value(query, "digest") == FOREIGN
    return go_form_value(query, "mount") == FOREIGN and go_form_value(query, "from") != ""


def check_route(entry: dict[str, Any]) -> str | None:
    method, target = entry["method"], entry["target"]
    if not registry_commits_foreign(method, target):
        return None
    try:
        decided = gateway_decides(decision_gateway(), method, target)
    except Exception as error:  # noqa: BLE001 - any exception is the finding
        return f"deciding raised {error!r}"
    return None if decided else f"the registry would take {FOREIGN} from this {method}, the gateway does not decide it"


def percent_encoded(draw: st.DrawFn, text: str, safe: str = "") -> str:
    """`text` with any of its characters written as %XX (either case of hex), at random."""
    out = []
    for character in text:
        if character not in safe and draw(st.booleans()):
            encoded = "".join(f"%{byte:02X}" for byte in character.encode())
            out.append(encoded.lower() if draw(st.booleans()) else encoded)
        else:
            out.append(character)
    return "".join(out)


names = st.lists(st.from_regex(r"[a-z0-9]+(?:[._-][a-z0-9]+)?", fullmatch=True), min_size=1, max_size=3).map("/".join)
noise_values = st.one_of(st.sampled_from([OTHER, "", "x", FOREIGN.upper(), "sha256:", FOREIGN + "0"]),
                         st.text(st.sampled_from("abc:=%+;&"), max_size=6))  # fmt: skip


@st.composite
def push_targets(draw: st.DrawFn) -> dict[str, Any]:
    method = draw(st.sampled_from(["PUT", "POST"]))
    name = draw(names)
    path = f"/v2/{name}/blobs/uploads/{SESSION}" if method == "PUT" else f"/v2/{name}/blobs/uploads/"
    path = percent_encoded(draw, path, safe="")
    parameter = "digest" if method == "PUT" else "mount"
    pairs = [f"_state={draw(st.text(st.sampled_from('AZaz09-_='), max_size=12))}"]
    if method == "POST":
        pairs.append(f"from={percent_encoded(draw, 'seed/repo')}")
    for _ in range(draw(st.integers(0, 3))):
        other = draw(st.sampled_from([parameter, "x", "", "Digest", parameter + " "]))
        pairs.append(f"{percent_encoded(draw, other)}={percent_encoded(draw, draw(noise_values))}")
    key = percent_encoded(draw, parameter)
    value = percent_encoded(draw, FOREIGN)
    pairs.insert(draw(st.integers(0, len(pairs))), f"{key}={value}")
    return {"method": method, "target": path + "?" + "&".join(pairs)}


def test_fuzz_every_query_and_path_spelling_the_registry_reads_as_the_foreign_digest_is_decided() -> None:
    def search(example: Callable[[dict[str, Any]], None]) -> None:
        @settings(max_examples=PURE_EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE)
        @given(push_targets())
        def run(entry: dict[str, Any]) -> None:
            example(entry)

        run()

    run_and_keep_failures("route", check_route, search)


def test_fuzz_any_path_is_classified_without_raising() -> None:
    def check(entry: dict[str, Any]) -> str | None:
        try:
            match_route(entry["path"])
        except Exception as error:  # noqa: BLE001
            return f"match_route raised {error!r}"
        return None

    def search(example: Callable[[dict[str, Any]], None]) -> None:
        alphabet = st.one_of(st.sampled_from(list("/.%2Fv_ab") + ["v2", "blobs", "uploads", "manifests", ".."]),
                             st.characters())  # fmt: skip

        @settings(max_examples=PURE_EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE)
        @given(st.lists(alphabet, max_size=40).map("".join))
        def run(path: str) -> None:
            example({"path": path})

        run()

    run_and_keep_failures("path", check, search)


# The manifest reader and the review ---------------------------------------------------------------

BASE_MANIFEST = json.loads(build_image(400, foreign=2, os="windows").manifest)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)


@st.composite
def mutated_manifests(draw: st.DrawFn) -> dict[str, Any]:
    """A real manifest with keys re-cased, duplicated or replaced, values retyped, bytes broken."""
    document = json.loads(json.dumps(BASE_MANIFEST))
    text_parts: list[str] = []

    def mutate(node: Any, depth: int) -> Any:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key, value in node.items():
                choice = draw(st.integers(0, 9))
                if choice == 0:
                    key = key.upper()
                elif choice == 1:
                    key = key.capitalize()
                elif choice == 2:
                    value = draw(json_values)
                elif choice == 3:
                    continue
                out[key] = mutate(value, depth + 1)
            return out
        if isinstance(node, list):
            items = [mutate(item, depth + 1) for item in node]
            if draw(st.integers(0, 9)) == 0:
                items = items * draw(st.integers(2, 50))
            return items
        return node

    mutated = mutate(document, 0)
    body = json.dumps(mutated)
    tricks = draw(st.lists(st.sampled_from(["dup-layers", "bad-utf8", "nest", "truncate", "nan", "bom"]), max_size=2))
    raw = body.encode()
    for trick in tricks:
        if trick == "dup-layers":
            raw = raw[:-1] + b', "layers": ' + json.dumps(draw(json_values)).encode() + b"}"
        elif trick == "bad-utf8":
            raw = raw.replace(b'"schemaVersion"', b'"schema\xffVersion"', 1)
        elif trick == "nest":
            levels = draw(st.sampled_from([10, 999, 1500, 20_000]))
            raw = raw[:-1] + b', "deep": ' + b"[" * levels + b"]" * levels + b"}"
        elif trick == "truncate":
            raw = raw[: draw(st.integers(0, len(raw)))]
        elif trick == "nan":
            raw = raw[:-1] + b', "n": NaN}'
        else:
            raw = b"\xef\xbb\xbf" + raw
    text_parts.append(raw.decode("latin-1"))
    content_type = draw(st.sampled_from([None, "", "application/json", BASE_MANIFEST["mediaType"],
                                         "application/vnd.oci.image.index.v1+json"]))  # fmt: skip
    return {"body_latin1": text_parts[0], "content_type": content_type}


def check_manifest(entry: dict[str, Any]) -> str | None:
    body = entry["body_latin1"].encode("latin-1")
    classifier = ForeignClassifier()
    policy = Policy()
    try:
        manifest = parse_manifest(body, entry["content_type"])
    except ManifestError:
        return None
    except Exception as error:  # noqa: BLE001
        return f"parse_manifest raised {error!r}"
    try:
        known = {FOREIGN: ForeignLayer(FOREIGN, next(iter(FOREIGN_MEDIA_TYPES)), 1)}
        review = review_manifest(policy, "fuzz/repo", manifest, (), classifier, known, {}, True)
        review_manifest(policy, "fuzz/repo", manifest, tuple(layer.digest for layer in manifest.layers),
                        classifier, known, known, False)  # fmt: skip
    except Exception as error:  # noqa: BLE001
        return f"review_manifest raised {error!r}"
    marked = {layer.digest for layer in manifest.layers if classifier.is_foreign(layer)}
    reviewed = {layer.digest for layer in review.foreign}
    if not marked <= reviewed:
        return f"layers marked foreign but not in the review: {sorted(marked - reviewed)}"
    return None


def test_fuzz_mutated_manifests_only_ever_raise_manifest_error() -> None:
    def search(example: Callable[[dict[str, Any]], None]) -> None:
        @settings(max_examples=PURE_EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE)
        @given(mutated_manifests())
        def run(entry: dict[str, Any]) -> None:
            example(entry)

        run()

    run_and_keep_failures("manifest", check_manifest, search)


# Raw HTTP to a running gateway --------------------------------------------------------------------


@pytest.fixture(scope="module")
def wire_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    require_binaries("docker-registry")
    registry = Registry(tmp_path_factory.mktemp("registry"), RegistryConfig(allow_foreign_urls=True))
    registry.start()
    gateway = GatewayProcess(tmp_path_factory.mktemp("gateway"), registry.url, args=["--log-level", "info"],
                             config={"server": {"idle_timeout": 2}})  # fmt: skip
    gateway.start()
    yield gateway
    gateway.stop()
    registry.stop()


def mostly(usual: st.SearchStrategy[bytes], rare: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """`usual` nine times in ten."""
    return st.integers(0, 9).flatmap(lambda roll: usual if roll else rare)


# aiohttp's parser refusing a request (answered 400) is logged as one of these; anything else it logs as an error
# while handling a request is an exception that escaped the gateway's handler (answered with aiohttp's bare 500).
PARSER_ERRORS = frozenset({
    "BadHttpMessage", "BadHttpMethod", "BadStatusLine", "LineTooLong", "InvalidHeader", "InvalidURLError",
    "TransferEncodingError", "ContentLengthError", "ContentEncodingError", "PayloadEncodingError",
    "HttpProcessingError", "HTTPVersionNotSupported",
})  # fmt: skip
ERROR_TYPE = re.compile(r"\((\w+)\)$")
AIOHTTP_BARE_500 = b"Server got itself in trouble"


def handler_crashes(log_lines: list[str]) -> list[str]:
    """Log lines that show an exception escaping a request handler (not a request refused by the parser)."""
    crashes = []
    for line in log_lines:
        if "Task exception was never retrieved" in line or "_handle_request" in line:
            crashes.append(line)
            continue
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if not str(entry.get("logger", "")).startswith("aiohttp") or entry.get("level") != "error":
            continue
        found = ERROR_TYPE.search(str(entry.get("event", "")))
        if found is None or found.group(1) not in PARSER_ERRORS:
            crashes.append(line)
    return crashes
token_bytes = st.binary(min_size=1, max_size=8).filter(lambda raw: b"\r" not in raw and b"\n" not in raw)
printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=16).map(str.encode)
KNOWN_HEADERS = st.sampled_from([
    b"Host", b"Content-Type", b"Accept", b"Authorization", b"Range", b"Content-Range", b"Connection", b"Upgrade",
    b"TE", b"Trailer", b"Forwarded", b"X-Forwarded-For", b"X-Forwarded-Host", b"X-Forwarded-Proto", b"X-Request-Id",
    b"Docker-Content-Digest", b"Accept-Encoding", b"Content-Encoding", b"Proxy-Authorization", b"Keep-Alive",
    b"Expect",
])  # fmt: skip
header_names = st.one_of(KNOWN_HEADERS, printable.filter(lambda raw: bool(raw) and b":" not in raw), token_bytes)
header_values = st.one_of(
    st.sampled_from([b"close", b"keep-alive", b"upgrade", b"websocket", b"h2c", b"trailers", b"chunked", b"gzip",
                     b"100-continue", b"bytes=0-10", b"0-10", b"application/x-www-form-urlencoded",
                     b"application/vnd.docker.distribution.manifest.v2+json", b"Basic Zm9vOmJhcg==", b"for=_hidden",
                     b"http", b"[::1]", b"a, b", b""]),
    printable,
    st.binary(max_size=12).filter(lambda raw: b"\r" not in raw and b"\n" not in raw),
)  # fmt: skip
path_parts = st.one_of(
    st.sampled_from([b"v2", b"_catalog", b"blobs", b"uploads", b"manifests", b"tags", b"list", b"referrers", b"..",
                     b".", b"", b"%2F", b"%2e%2e", b"%00", b"%zz", b"fuzz", b"app", FOREIGN.encode(), SESSION.encode(),
                     b"latest", b"%C3%A9", b"~", b";x=1", b"@", b":"]),
    printable.filter(lambda raw: b"?" not in raw and b"#" not in raw),
    st.binary(max_size=6).filter(lambda raw: not set(raw) & set(b" \r\n")),
)  # fmt: skip
path_parts = mostly(st.sampled_from([b"v2", b"blobs", b"uploads", b"manifests", b"fuzz", b"app", FOREIGN.encode(),
                                     SESSION.encode(), b"latest"]), path_parts)  # fmt: skip
query_pairs = st.lists(
    st.tuples(st.sampled_from([b"digest", b"mount", b"from", b"_state", b"n", b"last", b"x"]),
              st.one_of(st.sampled_from([FOREIGN.encode(), b"", b"%3A", b"+", b"fuzz%2Fapp"]), printable)),
    max_size=3,
).map(lambda pairs: b"&".join(key + b"=" + value.replace(b"&", b"%26").replace(b"#", b"%23") for key, value in pairs))


@st.composite
def wire_requests(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-framed registry requests with hostile details; now and then bytes that are not HTTP at all."""
    method = draw(mostly(
        st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE"]),
        st.one_of(st.sampled_from([b"OPTIONS", b"TRACE", b"CONNECT", b"PRI", b"get", b"SEARCH"]),
                  token_bytes.filter(lambda raw: b" " not in raw)),
    ))  # fmt: skip
    target = draw(mostly(
        st.lists(path_parts, min_size=1, max_size=6).map(lambda parts: b"/v2/" + b"/".join(parts)),
        st.one_of(
            st.lists(path_parts, max_size=6).map(lambda parts: b"/" + b"/".join(parts)),
            st.sampled_from([b"*", b"http://example.invalid/v2/", b"example.invalid:443", b"//v2/", b"/v2/?"]),
            st.binary(min_size=1, max_size=12).filter(lambda raw: not set(raw) & set(b" \r\n")),
        ),
    ))  # fmt: skip
    query = draw(query_pairs)
    if query:
        target += b"?" + query
    version = draw(mostly(st.just(b"HTTP/1.1"), st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"HTTX"])))
    headers = draw(st.lists(st.tuples(mostly(KNOWN_HEADERS, header_names), mostly(printable, header_values)), max_size=6))
    body = draw(st.binary(max_size=512))
    framing = draw(st.sampled_from(["length", "chunked", "none"]))
    head = [method + b" " + target + b" " + version, b"Host: fuzz"]
    framing_names = {b"content-length", b"transfer-encoding"}
    head += [name + b": " + value for name, value in headers if name.lower() not in framing_names]
    if framing == "length":
        head.append(b"Content-Length: %d" % len(body))
        payload_body = body
    elif framing == "chunked":
        head.append(b"Transfer-Encoding: chunked")
        payload_body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        payload_body = b""
    head.append(b"Connection: close")  # the answer then ends with the connection: no framing to guess
    payload = b"\r\n".join(head) + b"\r\n\r\n" + payload_body
    return {"request_latin1": payload.decode("latin-1")}


def check_wire(gateway: GatewayProcess, entry: dict[str, Any]) -> str | None:
    """Answered or closed, never a handler crash or a hang, and the gateway still serves."""
    payload = entry["request_latin1"].encode("latin-1")
    log_before = len(gateway.process.log_text())
    started = time.monotonic()
    answer = raw_exchange(gateway.host_port, payload, timeout=15)
    if time.monotonic() - started >= 15:
        return f"no answer and no close within 15 s (idle_timeout 2 s); got {answer[:200]!r}"
    if answer and not answer.startswith(b"HTTP/"):  # aiohttp echoes the request's version ("HTTP/2.0 200 OK")
        return f"not an HTTP answer: {answer[:200]!r}"
    if answer and not 100 <= status_of(answer) <= 599:
        return f"bad status line: {answer[:200]!r}"
    if not gateway.process.running:
        return "the gateway exited:\n" + gateway.process.log_text()[-2000:]
    if AIOHTTP_BARE_500 in answer:
        return f"aiohttp's own 500 (an exception escaped the handler): {answer[:300]!r}"
    written = gateway.process.log_text()[log_before:]
    crashes = handler_crashes(written[: written.rfind("\n") + 1].splitlines())  # whole lines only
    if crashes:
        return "unhandled exception in a handler: " + crashes[0][:1500]
    health = raw_exchange(gateway.host_port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=10)
    if status_of(health) != 200:
        return f"the gateway stopped serving: GET /v2/ gave {health[:200]!r}"
    return None


@pytest.mark.slow
def test_fuzz_raw_requests_never_crash_or_hang_the_gateway(wire_gateway: GatewayProcess) -> None:
    def search(example: Callable[[dict[str, Any]], None]) -> None:
        @settings(max_examples=WIRE_EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
        @given(wire_requests())
        def run(entry: dict[str, Any]) -> None:
            example(entry)

        run()

    run_and_keep_failures("wire", lambda entry: check_wire(wire_gateway, entry), search)


# The corpus ---------------------------------------------------------------------------------------


def corpus_entries() -> list[Path]:
    return sorted(CORPUS.glob("*.json"))


@pytest.mark.parametrize("path", corpus_entries(), ids=lambda path: path.stem)
def test_the_corpus_still_passes(path: Path, request: pytest.FixtureRequest) -> None:
    entry = json.loads(path.read_text())
    kind = entry["kind"]
    if kind == "route":
        problem = check_route(entry)
    elif kind == "path":
        problem = None
        match_route(entry["path"])
    elif kind == "manifest":
        problem = check_manifest(entry)
    elif kind == "wire":
        problem = check_wire(request.getfixturevalue("wire_gateway"), entry)
    else:
        raise AssertionError(f"{path.name}: unknown kind {kind!r}")
    assert problem is None, f"{path.name}: {problem}"


def test_the_crash_detector_tells_an_escaped_exception_from_a_refused_request() -> None:
    """The wire fuzz's notion of a crash, on log lines as the gateway writes them (aiohttp details filtered)."""
    refused = json.dumps({"level": "error", "logger": "aiohttp.server",
                          "event": "Error handling request from 127.0.0.1 (BadHttpMessage)"})  # fmt: skip
    escaped = json.dumps({"level": "error", "logger": "aiohttp.server",
                          "event": "Error handling request from 127.0.0.1 (UnicodeEncodeError)"})  # fmt: skip
    unfiltered = '{"level": "error", "logger": "aiohttp.server", "exception": "... in _handle_request ..."}'
    assert handler_crashes([refused, '{"level": "info", "event": "request"}', "plain text"]) == []
    assert handler_crashes([refused, escaped, unfiltered]) == [escaped, unfiltered]
