"""Request handling: every request passes through untouched, except pushes of known foreign layers."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import replace

from aiohttp import ClientResponse, HttpVersion11, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.cleanup import Cleaner
from proxy.config import Settings
from proxy.errors import (
    AMBIGUOUS_PUSH,
    FOREIGN_LAYER_DENIED,
    FOREIGN_LAYER_MISUSED,
    FORM_ENCODED_PUSH,
    INSPECTION_BUSY,
    MANIFEST_TOO_LARGE,
    UNVERIFIABLE_DIGEST,
    UNVERIFIABLE_UPLOAD,
    GatewayError,
    add_foreign_layer_hint,
)
from proxy.forwarding import (
    StreamAborted,
    Upstream,
    client_body,
    discard_body,
    read_capped,
    relay_body,
    request_body,
)
from proxy.headers import (
    Origins,
    client_scheme_and_host,
    downstream_response_headers,
    origin,
    upstream_request_headers,
    without_body_headers,
)
from proxy.inspection import (
    InspectedUpload,
    TentativeFeed,
    UploadInspections,
    UploadKey,
    matches_range,
)
from proxy.known import KnownForeign
from proxy.logs import log_event
from proxy.manifests import (
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    MAX_MANIFEST_BYTES,
    Descriptor,
    ForeignClassifier,
    ManifestError,
    parse_diff_ids,
    parse_manifest,
    sha256_digest,
)
from proxy.metrics import Metrics
from proxy.policy import Action, Decision, ManifestReview, review_manifest
from proxy.pushes import (
    form_body_refusal,
    names_blobs,
    read_push,
    registry_parses_digest,
    split_field,
)
from proxy.routes import RouteKind, RouteMatch, match_route, with_query_items
from proxy.store import Sighting

logger = logging.getLogger("foreign_layer_proxy.gateway")

REQUEST_ID = web.RequestKey("request_id", str)
ROUTE = web.RequestKey("route", RouteMatch)
DECISION = web.RequestKey("decision", Decision)
CONTINUE_SENT = web.RequestKey("continue_sent", bool)

MANIFEST_CONTENT_TYPES = IMAGE_MANIFEST_TYPES | INDEX_TYPES
SEEN_MANIFESTS_CAPACITY = 8192
# The most of a refused or dropped body read before answering: more than any layer seen in the field (Windows
# base layers are 1 to 3 GiB); past it, the answer goes out and the connection is closed.
MAX_DISCARDED_BYTES = 8 * 1024**3


class SeenManifests:
    """Manifest digests already parsed, so that repeated pulls of one manifest are streamed, not parsed."""

    def __init__(self, capacity: int = SEEN_MANIFESTS_CAPACITY):
        self.capacity = capacity
        self._digests: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, digest: object) -> bool:
        return digest in self._digests

    def add(self, digest: str) -> None:
        self._digests[digest] = None
        self._digests.move_to_end(digest)
        if len(self._digests) > self.capacity:
            self._digests.popitem(last=False)


def expects_continue(request: web.Request) -> bool:
    return request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue"


async def send_continue(request: web.Request) -> None:
    """The gateway answers `Expect: 100-continue` itself, and only once it has decided to take the body."""
    if expects_continue(request) and request.writer is not None:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request[CONTINUE_SENT] = True


async def no_automatic_continue(request: web.Request) -> None:
    """Route expect-handler: aiohttp must not send 100 Continue before the policy decided."""


def upload_session(status: int, location: str | None) -> UploadKey | None:
    """The (repository, session id) of an upload the registry just opened."""
    if status != 202 or location is None:
        return None
    session = match_route(URL(location, encoded=True).path)
    if session.kind is not RouteKind.UPLOAD_SESSION or session.repository is None or session.reference is None:
        return None
    return session.repository, session.reference


async def settle_body(request: web.Request, idle_timeout: float) -> bool:
    """Before the gateway answers a request it did not forward (a refusal, a drop): read what is left of its
    body, since many clients (python's requests among them) send all of it before they read any answer, and
    take a reset while sending for a network error, which they retry. False when only closing the connection
    after the answer is left: a client waiting for a 100 Continue it will not get (it sends nothing more), a
    body past MAX_DISCARDED_BYTES, or a client that stalls or leaves."""
    content = request_body(request)
    if content is None or content.at_eof():
        return True
    if expects_continue(request) and not request.get(CONTINUE_SENT, False):
        return False
    if (request.content_length or 0) > MAX_DISCARDED_BYTES:
        return False
    return await discard_body(content, MAX_DISCARDED_BYTES, idle_timeout)


class Gateway:
    def __init__(
        self, settings: Settings, upstream: Upstream, known: KnownForeign, metrics: Metrics, cleaner: Cleaner
    ):
        self.upstream = upstream
        self.upstream_origin = origin(upstream.origin.scheme, upstream.authority)
        self.known = known
        self.metrics = metrics
        self.cleaner = cleaner
        self.inspections = UploadInspections(settings.policy.inspect_max_uploads)
        self.seen_manifests = SeenManifests()
        self.settings = settings
        self.policy = settings.policy.policy
        self.classifier = ForeignClassifier(settings.foreign.all_media_types, settings.foreign.urls_mark_foreign)

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        self.inspections.capacity = settings.policy.inspect_max_uploads
        self.policy = settings.policy.policy
        self.classifier = ForeignClassifier(settings.foreign.all_media_types, settings.foreign.urls_mark_foreign)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = request[ROUTE]
        if names_blobs(route.kind, request.method):
            self.refuse_unverifiable_push(request, route)
        decision = self.decide(request, route)
        if decision is None and self.inspects(route):
            return await self.forward_inspected(request, route)
        if decision is not None:
            if route.kind is RouteKind.UPLOAD_SESSION:  # decided by name: its session is cancelled
                self.inspections.finish((route.repository or "", route.reference or ""))
            return await self.apply(request, route, decision)
        if route.kind is RouteKind.MANIFEST and request.method == "PUT":
            return await self.forward_manifest_put(request, route)
        if route.kind is RouteKind.MANIFEST and request.method == "GET":
            return await self.forward_manifest_get(request, route)
        return self.remember_upload(request, route, await self.forward(request))

    def refuse_unverifiable_push(self, request: web.Request, route: RouteMatch) -> None:
        """Pushes whose blob the gateway could not recognise: with a body the registry could read as a form (decided
        as Go decides), named ambiguously, or by a digest of another algorithm than the sha256 foreign layers are
        known by."""
        content_types = [value for name, value in request.raw_headers if name.lower() == b"content-type"]
        if (reason := form_body_refusal(request.method, content_types)) is not None:
            raise GatewayError(FORM_ENCODED_PUSH, f"{FORM_ENCODED_PUSH.message} (got {reason})")
        if route.repository is None or not self.policy.rule_for(route.repository)[1].blocks:
            return
        reading = read_push(route.kind, request.method, request.raw_path)
        if reading.ambiguous is not None:
            raise GatewayError(AMBIGUOUS_PUSH, f"{AMBIGUOUS_PUSH.message} (got {reading.ambiguous})")
        inspected = self.inspects(route) and request.method == "PUT"  # its bytes tell, whatever it is named by
        other = [d for d in reading.digests if registry_parses_digest(d) and not d.startswith("sha256:")]
        if other and not inspected:
            raise GatewayError(UNVERIFIABLE_DIGEST, f"{UNVERIFIABLE_DIGEST.message} (got {other[0][:20]}...)")

    async def apply(self, request: web.Request, route: RouteMatch, decision: Decision) -> web.StreamResponse:
        request[DECISION] = decision
        self.record(request, decision)
        if decision.action.blocks:
            return await self.enforce(request, route, decision)
        return self.remember_upload(request, route, await self.forward(request))

    def remember_upload(self, request: web.Request, route: RouteMatch, response: web.StreamResponse) -> web.StreamResponse:
        """Completed uploads are remembered for a while, for leak detection at manifest time."""
        if response.status == 201 and route.repository and names_blobs(route.kind, request.method):
            for digest in self.pushed_digests(request, route):
                self.known.record_upload(route.repository, digest, self.settings.policy.leak_window)
        return response

    def inspects(self, route: RouteMatch) -> bool:
        """Uploads are inspected, with `policy.inspect_content`, in repositories whose rule keeps foreign layers out."""
        return (
            self.settings.policy.inspect_content
            and route.kind in {RouteKind.UPLOAD_START, RouteKind.UPLOAD_SESSION}
            and route.repository is not None
            and self.policy.rule_for(route.repository)[1].blocks
        )

    async def forward_inspected(self, request: web.Request, route: RouteMatch) -> web.StreamResponse:
        """An upload with its content inspected: the inspector opens with the session, follows what the registry
        accepts, and decides the closing PUT on the blob's digest and diff_id before the registry may commit it."""
        key = (route.repository or "", route.reference or "")
        if request.method == "POST":
            return await self.start_inspected(request, route)
        if request.method == "PATCH" and request.body_exists:
            return await self.patch_inspected(request, key)
        if request.method == "PUT":
            return await self.complete_inspected(request, route, key)
        if request.method == "DELETE":
            self.inspections.finish(key)
        return await self.forward(request)

    async def start_inspected(self, request: web.Request, route: RouteMatch) -> web.StreamResponse:
        if request.body_exists and self.pushed_digests(request, route):
            raise GatewayError(UNVERIFIABLE_UPLOAD, f"{UNVERIFIABLE_UPLOAD.message} (a monolithic POST is not inspected)")
        if not self.inspections.reserve():
            raise GatewayError(INSPECTION_BUSY)
        reserved = True
        try:
            if request.body_exists:
                await send_continue(request)
            body = self.client_body(request) if request.body_exists else None
            async with self.upstream.open("POST", request.raw_path, self.upstream_headers(request), body) as upstream:
                opened = upload_session(upstream.status, upstream.headers.get("Location"))
                if opened is not None:
                    # Before the client has the answer: its next request may come on another connection.
                    self.inspections.open(opened)
                    reserved = False
                return self.remember_upload(request, route, await self.respond(request, upstream, None))
        finally:
            if reserved:
                self.inspections.release()

    async def patch_inspected(self, request: web.Request, key: UploadKey) -> web.StreamResponse:
        upload = self.inspections.get(key)
        if upload is None:
            return await self.forward(request)
        if upload.busy:
            upload.out_of_step = "two requests of the upload were under way at once"
            return await self.forward(request)
        await send_continue(request)
        feed = TentativeFeed(upload.inspector)
        upload.busy = True
        answered = False
        try:
            body = feed.body(self.client_body(request))
            async with self.upstream.open("PATCH", request.raw_path, self.upstream_headers(request), body) as upstream:
                await self.follow(upload, feed, upstream)
                answered = True
                return await self.respond(request, upstream, None)
        finally:
            upload.busy = False
            if not answered:
                upload.out_of_step = upload.out_of_step or "a chunk broke off on its way to the registry"

    @staticmethod
    async def follow(upload: InspectedUpload, feed: TentativeFeed, upstream: ClientResponse) -> None:
        """Keep what the registry accepted: the inspected copy, if its size is the registry's."""
        fed = await feed.settled()
        if upstream.status != 202:
            return
        if matches_range(fed, upstream.headers.get("Range")):
            upload.inspector = fed
        else:
            upload.out_of_step = f"the registry holds {upstream.headers.get('Range')!r}, not {fed.size} bytes"

    async def complete_inspected(self, request: web.Request, route: RouteMatch, key: UploadKey) -> web.StreamResponse:
        digests = self.pushed_digests(request, route)
        if not digests or route.repository is None:
            return await self.forward(request)
        upload = self.inspections.get(key)
        target = request.raw_path
        problem = "the gateway did not see this upload start" if upload is None else upload.unverifiable()
        if upload is not None and problem is None and request.body_exists:
            # The closing PUT's body goes up as a PATCH of the session, so that the decision comes before
            # the commit; the session is then closed (or cancelled) by a bodiless PUT.
            await send_continue(request)
            session_target, digest_items = split_field(request.raw_path, "digest")
            feed = TentativeFeed(upload.inspector)
            upload.busy = True
            try:
                body = feed.body(self.client_body(request))
                async with self.upstream.open("PATCH", session_target, self.upstream_headers(request), body) as patched:
                    await self.follow(upload, feed, patched)
                    location = patched.headers.get("Location")
                    if patched.status != 202 or location is None:
                        return await self.respond(request, patched, None)
                    await patched.read()
            except BaseException:
                upload.out_of_step = upload.out_of_step or "the closing chunk broke off on its way to the registry"
                raise
            finally:
                upload.busy = False
            target = with_query_items(URL(location, encoded=True).raw_path_qs, digest_items)
            problem = upload.unverifiable()
        self.inspections.finish(key)
        if upload is None or problem is not None:
            await self.cancel_upload(request, target)
            log_event(logger, logging.WARNING, "unverifiable_upload", repository=route.repository, reason=problem,
                      request_id=request[REQUEST_ID])  # fmt: skip
            raise GatewayError(UNVERIFIABLE_UPLOAD, f"{UNVERIFIABLE_UPLOAD.message} ({problem})")
        inspector = upload.inspector
        found = [digest for digest in (inspector.digest(), inspector.diff_id()) if digest]
        decision = self.policy.decide(route.repository, found, self.known.layers, self.known.diff_ids)
        if decision is not None:
            layer = replace(decision.layer, digest=digests[0], size=inspector.size)
            self.known.learn([layer], Sighting("inspection", route.repository))
            decision = request[DECISION] = replace(decision, layer=layer)
            self.record(request, decision)
            if decision.action.blocks:
                return await self.enforce(request, route, decision, session_target=target)
        headers = without_body_headers(self.upstream_headers(request))
        async with self.upstream.open("PUT", target, headers) as upstream:
            return self.remember_upload(request, route, await self.respond(request, upstream, None))

    # Decisions

    def decide(self, request: web.Request, route: RouteMatch) -> Decision | None:
        if route.repository is None:
            return None
        if request.method == "HEAD" and route.kind is RouteKind.BLOB and self.settings.policy.pretend_present:
            digests: list[str] = [route.reference] if route.reference else []
        elif names_blobs(route.kind, request.method):
            digests = self.pushed_digests(request, route)
        else:
            return None
        return self.policy.decide(route.repository, digests, self.known.layers, self.known.diff_ids)

    @staticmethod
    def pushed_digests(request: web.Request, route: RouteMatch) -> list[str]:
        """The blobs the registry would commit or mount for this request (proxy.pushes' table)."""
        return read_push(route.kind, request.method, request.raw_path).digests

    def record(self, request: web.Request, decision: Decision) -> None:
        log_event(
            logger,
            logging.INFO,
            "decision",
            action=decision.action.value,
            rule=decision.rule,
            repository=decision.repository,
            digest=decision.layer.digest,
            size=decision.layer.size,
            method=request.method,
            client=request.remote,
            user_agent=request.headers.get("User-Agent"),
            request_id=request[REQUEST_ID],
        )
        kept_out = decision.layer.size if decision.action.blocks else 0
        self.known.count(decision.layer.digest, decision.action.outcome, kept_out, decision.repository)
        self.metrics.decisions.labels(decision.action.outcome, decision.rule).inc()
        self.metrics.bytes_kept_out.inc(kept_out)

    async def enforce(
        self, request: web.Request, route: RouteMatch, decision: Decision, session_target: str | None = None
    ) -> web.StreamResponse:
        layer = decision.layer
        if request.method == "HEAD":
            return web.Response(
                status=200,
                headers={
                    "Content-Length": str(layer.size),
                    "Content-Type": "application/octet-stream",
                    "Docker-Content-Digest": layer.digest,
                },
            )
        if route.kind is RouteKind.UPLOAD_SESSION:
            await self.cancel_upload(request, session_target or request.raw_path)
        if decision.action is Action.REJECT:
            # Answered by the request middleware, which settles the body first, as for every refusal.
            raise GatewayError(
                replace(FOREIGN_LAYER_DENIED, status=self.settings.policy.reject_status),
                f"foreign layer {layer.digest} may not be pushed to {decision.repository} (rule: {decision.rule})",
                {
                    "digest": layer.digest,
                    "mediaType": layer.media_type,
                    "repository": decision.repository,
                    "rule": decision.rule,
                    "urls": list(layer.urls),
                    "hint": "foreign layers are not stored in this registry: push the image keeping the "
                    "layer's foreign media type and urls, without uploading the blob",
                },
            )
        dropped = web.Response(
            status=201,
            headers={
                "Location": f"/v2/{decision.repository}/blobs/{layer.digest}",
                "Docker-Content-Digest": layer.digest,
                "Content-Length": "0",
            },
        )
        if not await settle_body(request, self.settings.server.idle_timeout):
            dropped.force_close()
        return dropped

    async def cancel_upload(self, request: web.Request, session_target: str) -> None:
        """Abort the upstream session of a dropped or rejected upload, so the registry never commits it."""
        try:
            headers = without_body_headers(self.upstream_headers(request))
            async with self.upstream.open("DELETE", session_target, headers) as response:
                await read_capped(response.content, MAX_MANIFEST_BYTES)
                status = response.status
        except GatewayError as error:
            status = error.kind.status
        log_event(logger, logging.INFO, "upload_cancelled", status=status, request_id=request[REQUEST_ID])

    # Pass-through

    def origins(self, request: web.Request) -> Origins:
        own_scheme = "https" if request.secure else "http"
        scheme, host = client_scheme_and_host(request.headers, own_scheme, self.upstream.authority)
        return Origins(upstream=self.upstream_origin, client=origin(scheme, host))

    def client_body(self, request: web.Request) -> AsyncIterator[bytes]:
        return client_body(request_body(request), self.settings.server.idle_timeout)

    def upstream_headers(self, request: web.Request) -> CIMultiDict[str]:
        return upstream_request_headers(
            request.headers,
            settings=self.settings.forwarded,
            client_address=request.remote,
            own_scheme="https" if request.secure else "http",
            upstream_authority=None if self.settings.upstream.pass_host else self.upstream.authority,
            request_id=request[REQUEST_ID],
        )

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if request.body_exists:
            await send_continue(request)
        body = self.client_body(request) if request.body_exists else None
        async with self.upstream.open(request.method, request.raw_path, self.upstream_headers(request), body) as upstream:
            return await self.respond(request, upstream, None)

    async def forward_manifest_put(self, request: web.Request, route: RouteMatch) -> web.StreamResponse:
        await send_continue(request)
        try:
            async with asyncio.timeout(self.settings.server.idle_timeout):
                body = await read_capped(request_body(request), MAX_MANIFEST_BYTES)
        except TimeoutError:
            raise StreamAborted("client did not send its manifest in time") from None
        if body is None:
            raise GatewayError(MANIFEST_TOO_LARGE, f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
        repository = route.repository or ""
        manifest_digest = sha256_digest(body)
        review = await self.review(
            request, repository, body, request.content_type, check=self.settings.policy.manifest_check, pushed=True
        )
        if review is not None and review.misuses:
            # Anyone may send a manifest: of one the registry never saw, only layers whose blobs this
            # repository just received (an uploader the registry let in) are learned.
            leaked = await self.report_leaks(request, review, cleanup=False)
            self.learn(replace(review, foreign=tuple(layer for layer in review.foreign if layer.digest in leaked)),
                       "manifest-put", manifest_digest)  # fmt: skip
            raise self.refusal(request, review)
        async with self.upstream.open("PUT", request.raw_path, self.upstream_headers(request), body) as upstream:
            if review is None or not review.foreign:
                return await self.respond(request, upstream, None)
            if 200 <= upstream.status < 300:
                self.seen_manifests.add(manifest_digest)
                self.learn(review, "manifest-put", manifest_digest)
                await self.report_leaks(request, review, cleanup=self.settings.cleanup.delete_leaked)
                return await self.respond(request, upstream, None)
            return await self.respond(request, upstream, await self.explained_refusal(upstream, review))

    async def forward_manifest_get(self, request: web.Request, route: RouteMatch) -> web.StreamResponse:
        async with self.upstream.open("GET", request.raw_path, self.upstream_headers(request)) as upstream:
            if not self.worth_learning_from(upstream.status, upstream.headers) or route.repository is None:
                return await self.respond(request, upstream, None)
            body = await read_capped(upstream.content, MAX_MANIFEST_BYTES)
            if body is None:
                raise GatewayError(MANIFEST_TOO_LARGE, "upstream manifest larger than 4 MiB")
            manifest_digest = sha256_digest(body)
            self.seen_manifests.add(manifest_digest)
            review = await self.review(
                request, route.repository, body, upstream.content_type, check=False, pushed=False
            )
            if review is not None:
                self.learn(review, "manifest-get", manifest_digest)
            return await self.respond(request, upstream, body)

    # Manifests

    async def review(
        self, request: web.Request, repository: str, body: bytes, content_type: str | None, *, check: bool, pushed: bool
    ) -> ManifestReview | None:
        """The policy's view of an image manifest; None for lists, indexes and anything unparsable."""
        try:
            manifest = parse_manifest(body, content_type)
        except ManifestError:
            return None
        if manifest.is_index or manifest.config is None:
            return None
        known = self.known
        # A pushed manifest may list a recompressed foreign layer as an ordinary one: only its config's
        # diff_ids tell. Pulls are not checked for that, so that they cost no extra upstream request.
        wants_diff_ids = any(self.classifier.is_foreign(layer) for layer in manifest.layers) or (
            pushed and known.diff_ids and any(layer.digest not in known.layers for layer in manifest.layers)
        )
        diff_ids = await self.diff_ids(request, repository, manifest.config) if wants_diff_ids else ()
        return review_manifest(
            self.policy, repository, manifest, diff_ids, self.classifier, known.layers, known.diff_ids, check
        )

    async def diff_ids(self, request: web.Request, repository: str, config: Descriptor) -> tuple[str, ...]:
        """The image config's layer diff_ids, read through the upstream with the client's own credentials."""
        if config.size > MAX_MANIFEST_BYTES:
            return ()
        headers = without_body_headers(self.upstream_headers(request))
        try:
            async with self.upstream.open("GET", f"/v2/{repository}/blobs/{config.digest}", headers) as response:
                body = await read_capped(response.content, MAX_MANIFEST_BYTES) if response.status == 200 else None
        except GatewayError:
            return ()
        if body is None or sha256_digest(body) != config.digest:
            return ()
        return parse_diff_ids(body)

    def refusal(self, request: web.Request, review: ManifestReview) -> GatewayError:
        for misuse in review.misuses:
            log_event(logger, logging.INFO, "decision", action="refused", reason=misuse.reason.value,
                      rule=review.rule, repository=review.repository, digest=misuse.layer.digest,
                      client=request.remote, request_id=request[REQUEST_ID])  # fmt: skip
        self.metrics.decisions.labels("refused", review.rule).inc(len(review.misuses))
        first = review.misuses[0]
        return GatewayError(
            FOREIGN_LAYER_MISUSED,
            first.explain(review.repository, review.rule, review.action),
            {
                "repository": review.repository,
                "rule": review.rule,
                "layers": [
                    {"digest": misuse.layer.digest, "mediaType": misuse.listed_media_type, "reason": misuse.reason.value}
                    for misuse in review.misuses
                ],
            },
        )

    async def report_leaks(self, request: web.Request, review: ManifestReview, cleanup: bool) -> set[str]:
        """Foreign blobs that reached the registry before anything marked them: logged, counted, cleaned up."""
        leaked = await self.known.uploaded_recently(review.repository, [layer.digest for layer in review.foreign])
        for layer in review.foreign:
            if layer.digest in leaked:
                log_event(logger, logging.WARNING, "decision", action="leaked", rule=review.rule,
                          repository=review.repository, digest=layer.digest, size=layer.size,
                          client=request.remote, request_id=request[REQUEST_ID])  # fmt: skip
                self.known.count(layer.digest, "leaked", repository=review.repository)
                self.metrics.decisions.labels("leaked", review.rule).inc()
        if leaked and cleanup and review.action.blocks:
            self.cleaner.delete_later(review.repository, sorted(leaked))
        return leaked

    async def explained_refusal(self, upstream: ClientResponse, review: ManifestReview) -> bytes | None:
        """The registry's own error for a manifest with foreign layers, with the likely cause added."""
        if upstream.status not in {400, 500}:
            return None
        body = await read_capped(upstream.content, MAX_MANIFEST_BYTES)
        return add_foreign_layer_hint(body, {layer.digest for layer in review.foreign}) if body is not None else None

    def learn(self, review: ManifestReview, source: str, manifest_digest: str) -> None:
        new_layers = self.known.learn(review.foreign, Sighting(source, review.repository, manifest_digest))
        self.metrics.learned.labels(source).inc(len(new_layers))
        for layer in new_layers:
            log_event(logger, logging.INFO, "learned", digest=layer.digest, media_type=layer.media_type,
                      size=layer.size, diff_id=layer.diff_id, repository=review.repository,
                      manifest=manifest_digest, source=source)  # fmt: skip

    def worth_learning_from(self, status: int, headers: CIMultiDictProxy[str]) -> bool:
        length = headers.get("Content-Length")
        return (
            status == 200
            and headers.get("Content-Type", "").split(";")[0].strip() in MANIFEST_CONTENT_TYPES
            and not headers.get("Content-Encoding")
            and (length is None or (length.isdigit() and int(length) <= MAX_MANIFEST_BYTES))
            and headers.get("Docker-Content-Digest") not in self.seen_manifests
        )

    async def respond(self, request: web.Request, upstream: ClientResponse, body: bytes | None) -> web.StreamResponse:
        """Send the upstream's answer on: `body` when the gateway already read it, else streamed."""
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=downstream_response_headers(
                upstream.headers, self.origins(request), None if body is None else len(body)
            ),
        )
        try:
            await response.prepare(request)
            if request.method != "HEAD":
                if body is None:
                    await relay_body(upstream, response)
                else:
                    await response.write(body)
            await response.write_eof()
        except ConnectionError as error:
            # The client left (aiohttp raises ClientConnectionResetError for a write to its closing transport):
            # not the upstream's failure, which Upstream.open would make of any aiohttp error raised here.
            raise StreamAborted("client closed the connection") from error
        return response
