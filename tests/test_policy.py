"""Repository globs, rules and the decision for one push (proxy/policy.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.manifests import ForeignLayer
from proxy.policy import Action, Decision, Policy, Rule, glob_to_regex

FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"


def digest(number: int) -> str:
    return f"sha256:{number:064x}"


def foreign(number: int) -> ForeignLayer:
    return ForeignLayer(digest(number), FOREIGN_GZIP, 1000 + number, (f"https://example.com/{number}",))


# Globs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "repository", "matches"),
    [
        pytest.param("team/app", "team/app", True, id="literal"),
        pytest.param("team/app", "team/app2", False, id="literal-is-anchored-at-end"),
        pytest.param("team/app", "x/team/app", False, id="literal-is-anchored-at-start"),
        pytest.param("team/app", "team/ap", False, id="literal-prefix"),
        pytest.param("team.app", "teamxapp", False, id="dot-is-literal"),
        pytest.param("team+app", "team+app", True, id="regex-metacharacter-is-literal"),
        pytest.param("team/*", "team/app", True, id="star-one-segment"),
        pytest.param("team/*", "team/", True, id="star-empty"),
        pytest.param("team/*", "team/a/b", False, id="star-does-not-cross-slash"),
        pytest.param("*", "app", True, id="lone-star-one-segment"),
        pytest.param("*", "team/app", False, id="lone-star-not-two-segments"),
        pytest.param("team/*-dev", "team/app-dev", True, id="star-with-suffix"),
        pytest.param("team/*-dev", "team/app-prod", False, id="star-with-other-suffix"),
        pytest.param("team/**", "team/a/b/c", True, id="double-star-crosses-slash"),
        pytest.param("team/**", "team/app", True, id="double-star-one-segment"),
        pytest.param("team/**", "other/a", False, id="double-star-keeps-prefix"),
        pytest.param("**", "a/b/c", True, id="lone-double-star"),
        pytest.param("**/app", "app", True, id="leading-double-star-zero-segments"),
        pytest.param("**/app", "a/b/app", True, id="leading-double-star-many-segments"),
        pytest.param("**/app", "a/myapp", False, id="leading-double-star-whole-segment"),
        pytest.param("team/**/app", "team/app", True, id="middle-double-star-zero-segments"),
        pytest.param("team/**/app", "team/x/y/app", True, id="middle-double-star-many-segments"),
        pytest.param("team/**/app", "team/x/y/app/z", False, id="middle-double-star-anchored"),
        pytest.param("team/ap?", "team/app", True, id="question-one-character"),
        pytest.param("team/ap?", "team/ap", False, id="question-needs-a-character"),
        pytest.param("team/ap?", "team/appp", False, id="question-only-one-character"),
        pytest.param("team?app", "team/app", False, id="question-not-slash"),
    ],
)
def test_glob(pattern: str, repository: str, matches: bool) -> None:
    assert Rule(pattern, Action.ALLOW).matches(repository) is matches
    assert (glob_to_regex(pattern).match(repository) is not None) is matches


literal_patterns = st.text(min_size=1, max_size=20).filter(lambda text: "*" not in text and "?" not in text)
segments = st.text(st.characters(blacklist_characters="/*?", blacklist_categories=("Cs", "Cc")), min_size=1, max_size=8)


@given(literal_patterns, st.text(max_size=20))
def test_a_pattern_without_wildcards_matches_only_itself(pattern: str, other: str) -> None:
    assert Rule(pattern, Action.ALLOW).matches(pattern)
    assert Rule(pattern, Action.ALLOW).matches(other) is (other == pattern)


@given(segments, st.lists(segments, min_size=1, max_size=4))
def test_star_stays_in_one_segment_and_double_star_crosses(prefix: str, rest: list[str]) -> None:
    repository = "/".join([prefix, *rest])

    assert Rule(f"{prefix}/*", Action.ALLOW).matches(repository) is (len(rest) == 1)
    assert Rule(f"{prefix}/**", Action.ALLOW).matches(repository)
    assert Rule(f"**/{rest[-1]}", Action.ALLOW).matches(repository)
    assert Rule("/".join(["*"] * (len(rest) + 1)), Action.ALLOW).matches(repository)
    assert not Rule("/".join(["*"] * len(rest)), Action.ALLOW).matches(repository)


def test_rule_name_and_equality() -> None:
    assert Rule("team/**", Action.REJECT).name == "team/**"
    assert Rule("team/**", Action.REJECT) == Rule("team/**", Action.REJECT)
    assert Rule("team/**", Action.REJECT) != Rule("team/**", Action.ALLOW)


# Actions ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "blocks", "outcome"),
    [
        pytest.param(Action.DROP, True, "dropped", id="drop"),
        pytest.param(Action.REJECT, True, "rejected", id="reject"),
        pytest.param(Action.ALLOW, False, "allowed", id="allow"),
        pytest.param(Action.AUDIT, False, "audited", id="audit"),
    ],
)
def test_actions(action: Action, blocks: bool, outcome: str) -> None:
    assert action.blocks is blocks
    assert action.outcome == outcome


# Rules -------------------------------------------------------------------------------------------------

RULES = (
    Rule("team/secret", Action.REJECT),
    Rule("team/**", Action.ALLOW),
    Rule("**/windows-*", Action.AUDIT),
    Rule("team/other", Action.REJECT),
)


@pytest.mark.parametrize(
    ("policy", "repository", "expected"),
    [
        pytest.param(Policy(), "anything", ("default", Action.DROP), id="no-rules-default-drop"),
        pytest.param(Policy(Action.REJECT), "anything", ("default", Action.REJECT), id="no-rules-default-reject"),
        pytest.param(Policy(Action.AUDIT, RULES), "team/secret", ("team/secret", Action.REJECT),
                     id="first-rule-wins-over-later-broader"),
        pytest.param(Policy(Action.AUDIT, RULES), "team/app", ("team/**", Action.ALLOW), id="second-rule"),
        pytest.param(Policy(Action.AUDIT, RULES), "team/other", ("team/**", Action.ALLOW),
                     id="earlier-broader-rule-shadows-later-exact"),
        pytest.param(Policy(Action.REJECT, RULES), "infra/windows-base", ("**/windows-*", Action.AUDIT),
                     id="third-rule"),
        pytest.param(Policy(Action.REJECT, RULES), "infra/linux", ("default", Action.REJECT), id="no-rule-matches"),
        pytest.param(Policy(Action.REJECT, RULES), "teams/app", ("default", Action.REJECT), id="near-miss"),
    ],
)
def test_rule_for(policy: Policy, repository: str, expected: tuple[str, Action]) -> None:
    assert policy.rule_for(repository) == expected


@given(st.lists(st.tuples(st.sampled_from(["a", "a/*", "a/**", "**", "*", "b/?"]), st.sampled_from(list(Action))),
                max_size=5),
       st.sampled_from(list(Action)),
       st.sampled_from(["a", "a/b", "a/b/c", "b/c", "b/cc", "c"]))
def test_rule_for_is_the_first_match_else_default(
    rules: list[tuple[str, Action]], default: Action, repository: str
) -> None:
    policy = Policy(default, tuple(Rule(pattern, action) for pattern, action in rules))
    first = next(((p, a) for p, a in rules if glob_to_regex(p).match(repository)), ("default", default))

    assert policy.rule_for(repository) == first


# Decisions ---------------------------------------------------------------------------------------------

KNOWN = {digest(1): foreign(1), digest(2): foreign(2)}
REJECT_TEAM = Policy(Action.DROP, (Rule("team/**", Action.REJECT),))


@pytest.mark.parametrize(
    ("repository", "digests", "expected"),
    [
        pytest.param("team/app", [digest(1)], Decision(Action.REJECT, "team/**", "team/app", foreign(1)),
                     id="known-foreign-rule"),
        pytest.param("other", [digest(2)], Decision(Action.DROP, "default", "other", foreign(2)),
                     id="known-foreign-default"),
        pytest.param("team/app", [digest(3)], None, id="unknown-digest"),
        pytest.param("team/app", [], None, id="no-digest"),
        pytest.param("team/app", [digest(3), digest(1)], Decision(Action.REJECT, "team/**", "team/app", foreign(1)),
                     id="repeated-parameter-cannot-hide-foreign"),
        pytest.param("team/app", [digest(3), digest(4), digest(5), digest(2)],
                     Decision(Action.REJECT, "team/**", "team/app", foreign(2)), id="foreign-last-of-many"),
        pytest.param("team/app", ["not-a-digest", "", digest(1)],
                     Decision(Action.REJECT, "team/**", "team/app", foreign(1)), id="garbage-before-foreign"),
    ],
)
def test_decide(repository: str, digests: list[str], expected: Decision | None) -> None:
    assert REJECT_TEAM.decide(repository, digests, KNOWN) == expected


def test_decide_consumes_a_one_shot_iterable() -> None:
    decision = REJECT_TEAM.decide("team/app", iter([digest(9), digest(2)]), KNOWN)

    assert decision is not None and decision.layer == foreign(2)


@given(st.lists(st.integers(1, 6), max_size=6), st.sampled_from(list(Action)))
def test_decide_finds_a_foreign_digest_wherever_it_is(numbers: list[int], default: Action) -> None:
    known = {digest(n): foreign(n) for n in (2, 4)}
    decision = Policy(default).decide("repo", [digest(n) for n in numbers], known)
    foreign_numbers = [n for n in numbers if n in (2, 4)]

    if not foreign_numbers:
        assert decision is None
    else:
        assert decision is not None
        assert decision.layer.digest in {digest(n) for n in foreign_numbers}
        assert (decision.action, decision.rule, decision.repository) == (default, "default", "repo")
