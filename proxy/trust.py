"""Who may teach the gateway what is foreign, and where what they taught applies. Pure: no I/O.

A *teaching* is one source's word that a digest is foreign: a repository whose manifest named it, or an
operator (`learn`, a scan, `promote`). Each teaching applies in a *scope*: EVERYWHERE, or one namespace.
A teaching is a *candidate* when the layer's `urls` are not trusted (foreign.trusted_urls): it is only
audited until an operator promotes it. A digest's *reach* sums up its teachings; the hot path reads it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

EVERYWHERE = "*"
# A rule's glob as a scope, so that it cannot be mistaken for a first path segment (which has no ':').
GLOB_SCOPE_PREFIX = "glob:"
HOUR = 3600.0
# Repositories whose hourly window the budget tracks before it drops the expired ones.
TRACKED_REPOSITORIES = 100_000


class LearningScope(StrEnum):
    """foreign.learning_scope: where what an ordinary repository teaches applies."""

    GLOBAL = "global"
    NAMESPACE = "namespace"


class Teaches(StrEnum):
    """A rule's `teaches`: where what its repositories teach applies."""

    EVERYWHERE = "everywhere"
    NAMESPACE = "namespace"
    NOWHERE = "nowhere"


class Standing(StrEnum):
    """How a known digest counts in one scope: enforced by the rule, or only audited (a candidate)."""

    ENFORCED = "enforced"
    CANDIDATE = "candidate"


@dataclass(frozen=True, slots=True)
class Reach:
    """The scopes where a digest is enforced, and those where it is only a candidate.

    A digest enforced everywhere has no Reach (None): the common case costs the hot path one failed
    dict look-up.
    """

    enforced: frozenset[str] = frozenset()
    candidate: frozenset[str] = frozenset()

    def standing(self, scope: str) -> Standing | None:
        if scope in self.enforced or EVERYWHERE in self.enforced:
            return Standing.ENFORCED
        if scope in self.candidate or EVERYWHERE in self.candidate:
            return Standing.CANDIDATE
        return None


@dataclass(frozen=True, slots=True)
class Teaching:
    """One source's word that a digest is foreign. `repository` is None for operator sources without one."""

    repository: str | None
    source: str
    manifest_digest: str | None
    scope: str = EVERYWHERE
    candidate: bool = False
    taught_at: float = 0.0

    @property
    def teacher(self) -> str:
        return self.repository or self.source


def with_teaching(teachings: Sequence[Teaching], new: Teaching) -> tuple[Teaching, ...]:
    """`teachings` and `new`: one teaching per repository and scope, the first kept, a candidate
    promoted when the same teacher vouches for it again with trusted urls."""
    merged = list(teachings)
    for index, known in enumerate(merged):
        if (known.repository, known.scope) == (new.repository, new.scope):
            merged[index] = replace(known, candidate=known.candidate and new.candidate)
            return tuple(merged)
    return (*merged, new)


def reach_of(teachings: Iterable[Teaching]) -> Reach | None:
    """None: enforced everywhere (also for a digest without teachings, from before they were recorded)."""
    enforced: set[str] = set()
    candidate: set[str] = set()
    for teaching in teachings:
        (candidate if teaching.candidate else enforced).add(teaching.scope)
    if not enforced and not candidate or EVERYWHERE in enforced:
        return None
    return Reach(frozenset(enforced), frozenset(candidate - enforced))


def widened(reach: Reach | None, known: bool, scope: str, candidate: bool) -> Reach | None:
    """The reach of a digest (`known` or not yet) after one more teaching, as reach_of would give it."""
    if known and reach is None:
        return None
    enforced, candidates = (reach.enforced, reach.candidate) if reach is not None else (frozenset(), frozenset())
    if candidate:
        return Reach(enforced, candidates | {scope} if scope not in enforced else candidates)
    if scope == EVERYWHERE:
        return None
    return Reach(enforced | {scope}, candidates - {scope})


def teaches_more(reach: Reach | None, known: bool, scope: str, candidate: bool) -> bool:
    """Whether one more teaching changes what is enforced or audited anywhere."""
    return not known or widened(reach, known, scope, candidate) != reach


def encode_teachings(teachings: Sequence[Teaching]) -> str:
    return json.dumps(
        [[t.repository, t.source, t.manifest_digest, t.scope, t.candidate, t.taught_at] for t in teachings],
        separators=(",", ":"),
    )


def decode_teachings(text: str | None) -> tuple[Teaching, ...]:
    if not text:
        return ()
    return tuple(Teaching(r, s, m, scope, bool(c), float(at)) for r, s, m, scope, c, at in json.loads(text))


def encode_reach(reach: Reach | None) -> str | None:
    if reach is None:
        return None
    return json.dumps([sorted(reach.enforced), sorted(reach.candidate)], separators=(",", ":"))


def decode_reach(text: str | None) -> Reach | None:
    if text is None:
        return None
    enforced, candidate = json.loads(text)
    return Reach(frozenset(enforced), frozenset(candidate))


def namespace_of(repository: str) -> str:
    """A repository's first path segment: `tenant-a` for `tenant-a/team/app`."""
    return repository.partition("/")[0]


@dataclass(frozen=True, slots=True)
class TrustedUrls:
    """foreign.trusted_urls: a foreign layer is trusted when every one of its urls matches one pattern
    (searched, as distribution's validation.manifests.urls.allow is). A layer without urls has nothing
    to distrust: the manifest check deals with it."""

    patterns: tuple[re.Pattern[str], ...] = (re.compile(r"^https?://"),)

    def trust(self, urls: Iterable[str]) -> bool:
        return all(any(pattern.search(url) for pattern in self.patterns) for url in urls)


@dataclass(slots=True)
class LearningBudget:
    """How many foreign layers untrusted sources may still teach: per manifest, and per repository per
    hour (a fixed window per repository, in this process)."""

    per_manifest: int = 64
    per_repository_hour: int = 1000
    clock: Callable[[], float] = time.monotonic
    _windows: dict[str, tuple[float, int]] = field(default_factory=dict)

    def admit(self, repository: str, wanted: int) -> tuple[int, str | None]:
        """How many of `wanted` new layers one manifest of `repository` may teach, and the limit that
        stopped the rest ("manifest" or "repository"), if any."""
        now = self.clock()
        if len(self._windows) >= TRACKED_REPOSITORIES:
            self._windows = {name: window for name, window in self._windows.items() if now - window[0] < HOUR}
        started, used = self._windows.get(repository, (now, 0))
        if now - started >= HOUR:
            started, used = now, 0
        admitted = min(wanted, self.per_manifest, max(0, self.per_repository_hour - used))
        self._windows[repository] = (started, used + admitted)
        if admitted == wanted:
            return admitted, None
        return admitted, "manifest" if admitted == self.per_manifest else "repository"
