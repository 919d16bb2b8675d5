"""Foreign-layer policy: repository rules and the decision for one push. No I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from proxy.manifests import ForeignLayer


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
    matcher: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "matcher", glob_to_regex(self.repository))

    def matches(self, repository: str) -> bool:
        return self.matcher.match(repository) is not None

    @property
    def name(self) -> str:
        return self.repository


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    rule: str
    repository: str
    layer: ForeignLayer


@dataclass(frozen=True, slots=True)
class Policy:
    default: Action = Action.DROP
    rules: tuple[Rule, ...] = ()

    def rule_for(self, repository: str) -> tuple[str, Action]:
        """The first matching rule's name and action, else ("default", default)."""
        for rule in self.rules:
            if rule.matches(repository):
                return rule.name, rule.action
        return "default", self.default

    def decide(
        self, repository: str, digests: Iterable[str], known: Mapping[str, ForeignLayer]
    ) -> Decision | None:
        """The decision for a push naming `digests`, or None when none of them is known to be foreign.

        Every candidate digest is checked, so that a request naming a digest twice (repeated query
        parameters) cannot slip a foreign one past the first.
        """
        for digest in digests:
            layer = known.get(digest)
            if layer is not None:
                rule, action = self.rule_for(repository)
                return Decision(action=action, rule=rule, repository=repository, layer=layer)
        return None
