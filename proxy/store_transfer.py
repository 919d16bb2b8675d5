"""A store's content as JSON lines, to back it up or move it to another backend (SQLite -> Redis).

The first line names the format; then one line per known layer with its history, then one per repository
with its counts. Upload records (leak detection, minutes long) are not part of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from proxy.manifests import ForeignLayer, is_digest
from proxy.store import ForeignRecord, ForeignStore, RepositoryStats, Sighting
from proxy.trust import EVERYWHERE, Teaching

FORMAT = "foreign-layer-proxy-store"
VERSION = 1


class TransferError(Exception):
    """An import line that is not what an export writes; the message names the line."""


async def export_lines(store: ForeignStore) -> list[str]:
    records, repositories = await store.records(), await store.repository_stats()
    lines = [json.dumps({"format": FORMAT, "version": VERSION})]
    lines += [json.dumps({"kind": "layer", **asdict(record)}) for record in records]
    lines += [json.dumps({"kind": "repository", **asdict(stats)}) for stats in repositories]
    return lines


def parse_lines(lines: Iterable[str]) -> tuple[list[ForeignRecord], list[RepositoryStats]]:
    records: list[ForeignRecord] = []
    repositories: list[RepositoryStats] = []
    header_seen = False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            document = json.loads(line)
            if not header_seen:
                if not _is_header(document):
                    raise ValueError(f'expected the header {{"format": "{FORMAT}", "version": {VERSION}}}')
                header_seen = True
                continue
            kind = document.pop("kind")
            if kind == "layer":
                records.append(_record(document))
            elif kind == "repository":
                repositories.append(_repository(document))
            else:
                raise ValueError(f"unknown kind {kind!r}")
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise TransferError(f"line {number}: {error}") from None
    if not header_seen:
        raise TransferError("no export in the input (expected what `store export` writes)")
    return records, repositories


def _is_header(document: Any) -> bool:
    return isinstance(document, dict) and document.get("format") == FORMAT and document.get("version") == VERSION


def _counts(value: Any) -> dict[str, int]:
    if not isinstance(value, dict) or not all(isinstance(v, int) and v >= 0 for v in value.values()):
        raise ValueError("outcomes must map outcome names to counts")
    return {str(outcome): count for outcome, count in value.items()}


def _record(document: dict[str, Any]) -> ForeignRecord:
    layer = document["layer"]
    if not is_digest(layer["digest"]):
        raise ValueError(f"not a digest: {str(layer['digest'])[:80]!r}")
    first_sighting, first_seen = Sighting(**document["first_sighting"]), float(document["first_seen"])
    # An export written before teachings were recorded: taught everywhere by its first sighting, as a store upgrades it.
    teachings = tuple(Teaching(**teaching) for teaching in document.get("teachings", ())) or (
        Teaching(first_sighting.repository, first_sighting.source, first_sighting.manifest_digest, EVERYWHERE,
                 taught_at=first_seen),
    )  # fmt: skip
    return ForeignRecord(
        layer=ForeignLayer(
            str(layer["digest"]), str(layer["media_type"]), int(layer["size"]), tuple(layer["urls"]), layer["diff_id"]
        ),
        first_sighting=first_sighting,
        last_sighting=Sighting(**document["last_sighting"]),
        first_seen=first_seen,
        last_seen=float(document["last_seen"]),
        outcomes=_counts(document["outcomes"]),
        bytes_kept_out=int(document["bytes_kept_out"]),
        teachings=teachings,
    )


def _repository(document: dict[str, Any]) -> RepositoryStats:
    return RepositoryStats(str(document["repository"]), _counts(document["outcomes"]), int(document["bytes_kept_out"]))
