"""Foreign-layer policy: repository rules and the decision for one push. No I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from proxy.manifests import ForeignClassifier, ForeignLayer, Manifest
from proxy.trust import (
    EVERYWHERE,
    GLOB_SCOPE_PREFIX,
    LearningScope,
    Reach,
    Standing,
    Teaches,
    namespace_of,
)

EMPTY: Mapping[str, ForeignLayer] = MappingProxyType({})
NO_REACH: Mapping[str, Reach] = MappingProxyType({})


class Action(StrEnum):
    DROP = "drop"
    REJECT = "reject"
    ALLOW = "allow"
    AUDIT = "audit"

    @property
    def blocks(self) -> bool:
        return self in (Action.DROP, Action.REJECT)

    @property
    def outcome(self) -> str:
        """What the decision is counted as in the store, logs and metrics."""
        return {"drop": "dropped", "reject": "rejected", "allow": "allowed", "audit": "audited"}[self.value]


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """`**` matches across `/`, `*` within one path segment, `?` one character of a segment."""
    parts: list[str] = []
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            parts.append("(?:.*/)?")
            index += 3
        elif pattern.startswith("**", index):
            parts.append(".*")
            index += 2
        elif pattern[index] == "*":
            parts.append("[^/]*")
            index += 1
        elif pattern[index] == "?":
            parts.append("[^/]")
            index += 1
        else:
            parts.append(re.escape(pattern[index]))
            index += 1
    return re.compile("".join(parts) + r"\Z")


@dataclass(frozen=True, slots=True)
class Rule:
    repository: str
    action: Action
    teaches: Teaches | None = None
    matcher: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "matcher", glob_to_regex(self.repository))

    def matches(self, repository: str) -> bool:
        return self.matcher.match(repository) is not None

    @property
    def name(self) -> str:
        return self.repository


def _scope(repository: str, rule: Rule | None) -> str:
    if rule is not None and rule.teaches is Teaches.NAMESPACE:
        return GLOB_SCOPE_PREFIX + rule.repository
    return namespace_of(repository)


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    rule: str
    repository: str
    layer: ForeignLayer
    # Known only from a teaching whose urls are not trusted: audited whatever the rule says.
    candidate: bool = False


@dataclass(frozen=True, slots=True)
class Policy:
    default: Action = Action.DROP
    rules: tuple[Rule, ...] = ()
    learning_scope: LearningScope = LearningScope.GLOBAL

    def rule_matching(self, repository: str) -> Rule | None:
        for rule in self.rules:
            if rule.matches(repository):
                return rule
        return None

    def rule_for(self, repository: str) -> tuple[str, Action]:
        """The first matching rule's name and action, else ("default", default)."""
        rule = self.rule_matching(repository)
        return ("default", self.default) if rule is None else (rule.name, rule.action)

    def scope_of(self, repository: str) -> str:
        """The namespace `repository` teaches in and reads from: the glob of its rule when that rule says
        `teaches: namespace`, else its first path segment."""
        return _scope(repository, self.rule_matching(repository))

    def teaching_scope(self, repository: str) -> str | None:
        """Where what a manifest of `repository` teaches applies: EVERYWHERE, a namespace, or None (nowhere)."""
        rule = self.rule_matching(repository)
        teaches = rule.teaches if rule is not None else None
        if teaches is None:
            teaches = Teaches.EVERYWHERE if self.learning_scope is LearningScope.GLOBAL else Teaches.NAMESPACE
        if teaches is Teaches.NOWHERE:
            return None
        return EVERYWHERE if teaches is Teaches.EVERYWHERE else _scope(repository, rule)

    def standing(self, repository: str, digest: str, reach: Mapping[str, Reach]) -> Standing | None:
        """How a known digest counts in `repository`; None: it was taught elsewhere only."""
        scoped = reach.get(digest)
        return Standing.ENFORCED if scoped is None else scoped.standing(self.scope_of(repository))

    def decide(
        self,
        repository: str,
        digests: Iterable[str],
        known: Mapping[str, ForeignLayer],
        known_diff_ids: Mapping[str, ForeignLayer] = EMPTY,
        reach: Mapping[str, Reach] = NO_REACH,
    ) -> Decision | None:
        """The decision for a push naming `digests`, or None when none of them is known to be foreign here.

        Every candidate digest is checked, so that a request naming a digest twice (repeated query
        parameters) cannot slip a foreign one past the first. A digest equal to a known foreign
        layer's diff_id is that layer pushed uncompressed. `reach` holds the digests that are not
        enforced everywhere (taught in some namespaces only, or candidates).
        """
        for digest in digests:
            layer = known.get(digest)
            if layer is None and (match := known_diff_ids.get(digest)) is not None:
                layer = ForeignLayer(digest, match.media_type, match.size, match.urls, digest)
                scoped = reach.get(match.digest)
            elif layer is not None:
                scoped = reach.get(digest)
            else:
                continue
            rule = self.rule_matching(repository)
            standing = Standing.ENFORCED if scoped is None else scoped.standing(_scope(repository, rule))
            if standing is None:
                continue
            name, action = ("default", self.default) if rule is None else (rule.name, rule.action)
            if standing is Standing.CANDIDATE:
                return Decision(Action.AUDIT, name, repository, layer, candidate=True)
            return Decision(action=action, rule=name, repository=repository, layer=layer)
        return None


class MisuseReason(StrEnum):
    LISTED_AS_ORDINARY = "listed-as-ordinary"
    WITHOUT_URLS = "foreign-without-urls"


@dataclass(frozen=True, slots=True)
class Misuse:
    layer: ForeignLayer
    listed_media_type: str
    reason: MisuseReason

    def explain(self, repository: str, rule: str, action: Action) -> str:
        where = f"this registry does not store foreign layers in {repository} (rule {rule}: {action.value})"
        if self.reason is MisuseReason.LISTED_AS_ORDINARY:
            return (
                f"layer {self.layer.digest} is a foreign (non-distributable) layer but the manifest lists it as "
                f"an ordinary layer ({self.listed_media_type}); {where}. Push the image keeping the layer's "
                f"foreign media type and its urls, so that pullers fetch it from its source"
            )
        return (
            f"foreign layer {self.layer.digest} has no urls and {where}, so pullers would have no way to fetch "
            f"it. Push the image keeping the layer's urls (a client that recompresses foreign layers drops them)"
        )


@dataclass(frozen=True, slots=True)
class ManifestReview:
    """What one image manifest means to the policy, before and after the upstream sees it."""

    repository: str
    rule: str
    action: Action
    foreign: tuple[ForeignLayer, ...]
    misuses: tuple[Misuse, ...]


def review_manifest(
    policy: Policy,
    repository: str,
    manifest: Manifest,
    diff_ids: tuple[str, ...],
    classifier: ForeignClassifier,
    known: Mapping[str, ForeignLayer],
    known_diff_ids: Mapping[str, ForeignLayer],
    check: bool,
    reach: Mapping[str, Reach] = NO_REACH,
) -> ManifestReview:
    """Foreign layers are those the manifest marks, and those it lists as ordinary whose digest or
    uncompressed digest (diff_id; recompressing clients change the digest) is known to be foreign in
    this repository's scope. Misuses are reported only when `check` is on, the repository's rule keeps
    foreign layers out and the layer is enforced here (not a candidate).
    """
    rule, action = policy.rule_for(repository)
    aligned = len(diff_ids) == len(manifest.layers)
    foreign: list[ForeignLayer] = []
    misuses: list[Misuse] = []
    for index, listed in enumerate(manifest.layers):
        diff_id = diff_ids[index] if aligned else None
        if classifier.is_foreign(listed):
            layer = ForeignLayer(listed.digest, listed.media_type, listed.size, listed.urls, diff_id)
            reason = None if listed.urls else MisuseReason.WITHOUT_URLS
        else:
            match = known.get(listed.digest) or (known_diff_ids.get(diff_id) if diff_id else None)
            standing = policy.standing(repository, match.digest, reach) if match is not None else None
            if match is None or standing is None:
                continue
            layer = ForeignLayer(listed.digest, match.media_type, listed.size, match.urls, diff_id or match.diff_id)
            reason = MisuseReason.LISTED_AS_ORDINARY if standing is Standing.ENFORCED else None
        foreign.append(layer)
        if reason is not None and check and action.blocks:
            misuses.append(Misuse(layer, listed.media_type, reason))
    return ManifestReview(repository, rule, action, tuple(foreign), tuple(misuses))
