"""Every error the gateway itself answers with: OCI error codes, statuses and bodies, in one place."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass(frozen=True, slots=True)
class ErrorKind:
    name: str
    code: str
    status: int
    message: str
    retry_after: int | None = None

    @property
    def upstream(self) -> bool:
        return self.name.startswith("upstream_")


UPSTREAM_UNREACHABLE = ErrorKind("upstream_unreachable", "UNAVAILABLE", 502, "upstream registry is unreachable")
UPSTREAM_TIMEOUT = ErrorKind("upstream_timeout", "UNAVAILABLE", 504, "upstream registry did not answer in time")
UPSTREAM_BROKEN = ErrorKind("upstream_broken", "UNAVAILABLE", 502, "upstream registry sent an invalid response")
FOREIGN_LAYER_DENIED = ErrorKind("foreign_layer_denied", "DENIED", 403, "foreign layer may not be pushed")
FOREIGN_LAYER_MISUSED = ErrorKind("foreign_layer_misused", "MANIFEST_INVALID", 400, "manifest misuses a foreign layer")
MANIFEST_TOO_LARGE = ErrorKind("manifest_too_large", "SIZE_INVALID", 413, "manifest larger than 4 MiB")
FORM_ENCODED_PUSH = ErrorKind(
    "form_encoded_push",
    "UNSUPPORTED",
    400,
    "blob uploads with form-encoded bodies are not accepted: name the digest in the URL's query",
)
UNVERIFIABLE_DIGEST = ErrorKind(
    "unverifiable_digest",
    "DIGEST_INVALID",
    400,
    "this registry's gateway accepts blob pushes named by sha256 digests only (or with policy.inspect_content)",
)
AMBIGUOUS_PUSH = ErrorKind(
    "ambiguous_push",
    "DIGEST_INVALID",
    400,
    "this push names its blob in a way registries read differently: name it once, with `&`-separated parameters",
)
UNVERIFIABLE_UPLOAD = ErrorKind(
    "unverifiable_upload",
    "BLOB_UPLOAD_INVALID",
    400,
    "the gateway could not inspect this upload, so it may not complete: start it again through the gateway",
)
INSPECTION_BUSY = ErrorKind(
    "inspection_busy", "TOOMANYREQUESTS", 429, "too many uploads are being inspected: try again later", retry_after=10
)
NOT_A_FORWARD_PROXY = ErrorKind(
    "not_a_forward_proxy",
    "UNSUPPORTED",
    400,
    "absolute-form and CONNECT requests are not accepted: this is not a forward proxy",
)


MAX_REASON_CHARACTERS = 300


class GatewayError(Exception):
    def __init__(self, kind: ErrorKind, message: str | None = None, detail: Mapping[str, Any] | None = None):
        super().__init__(message or kind.message)
        self.kind = kind
        self.detail: Mapping[str, Any] = detail or {}


def error_body(code: str, message: str, detail: Mapping[str, Any] | None = None) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message, "detail": dict(detail or {})}]}).encode()


def reason_phrase(message: str) -> str:
    """The message as an HTTP reason phrase: clients such as ctr print only the status line."""
    printable = "".join(character if " " <= character <= "~" else " " for character in message)
    return printable[:MAX_REASON_CHARACTERS]


def error_response(error: GatewayError) -> web.Response:
    return web.Response(
        status=error.kind.status,
        reason=reason_phrase(str(error)),
        body=error_body(error.kind.code, str(error), error.detail),
        content_type="application/json",
        headers={"Retry-After": str(error.kind.retry_after)} if error.kind.retry_after is not None else None,
    )


FOREIGN_URL_HINT = (
    "the manifest has foreign layers: the registry is probably refusing their urls or expecting their blobs. "
    "With CNCF distribution allow the urls in its config (validation: manifests: urls: allow: ['^https?://']); "
    "Harbor, Quay and zot accept them by default"
)
HINTED_CODES = frozenset({"UNKNOWN", "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID"})


def add_foreign_layer_hint(body: bytes, foreign_digests: set[str]) -> bytes:
    """An upstream OCI error body with the likely cause of a foreign-layer refusal added to its messages."""
    try:
        document = json.loads(body)
        errors = document["errors"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return body
    if not isinstance(errors, list):
        return body
    hinted = False
    for error in errors:
        if not isinstance(error, dict) or error.get("code") not in HINTED_CODES:
            continue
        detail = json.dumps(error.get("detail"))
        if error["code"] == "UNKNOWN" or any(digest in detail for digest in foreign_digests):
            error["message"] = f"{error.get('message', '')} ({FOREIGN_URL_HINT})"
            hinted = True
    return json.dumps(document).encode() if hinted else body
