"""The OCI distribution-spec conformance suite, run against the registry directly and through the gateway
in every policy mode: a transparent gateway gives the registry's results, test by test.

Each run gets a registry with fresh storage; the direct run and the four gateway runs of one upstream
go at once (they share nothing but the machine).
"""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from support.gateway import GatewayProcess
from support.go_clients import UPSTREAMS, go_tool, require_go_tools, upstream_release
from support.registry import (
    Registry,
    RegistryConfig,
    Release,
)

SUITE_TIMEOUT = 180.0

MODES: Mapping[str, tuple[list[str], Mapping[str, Any] | None]] = {
    "drop": (["--action", "drop"], None),
    "reject": (["--action", "reject"], None),
    "audit": (["--action", "audit"], None),
    "inspect_content": (["--action", "drop"], {"policy": {"inspect_content": True}}),
}

# What the pinned suite gives against each pinned registry directly (passed, failed, skipped): a
# harness that runs nothing, or runs against the wrong thing, cannot pass. The failures are the
# registries' own gaps (see README, Tests); with the suite at v1.1.0 2.8.2 gives 62/13/5 (one more
# referrers spec), a tag the module proxy does not serve (see tests/tools/go-tools.txt).
DIRECT_TOTALS = {
    "distribution-2.8": (62, 12, 5),
    "distribution-3": (69, 5, 5),
}

Outcome = tuple[str, str]


@dataclass(frozen=True)
class SuiteRun:
    label: str
    results: Counter[Outcome]
    output: str

    @property
    def totals(self) -> tuple[int, int, int]:
        by_status = Counter(status for (_, status), count in self.results.items() for _ in range(count))
        return by_status["passed"], by_status["failed"], by_status["skipped"]


def junit_outcomes(path: Path) -> Counter[Outcome]:
    """(test name, passed|failed|skipped) of every spec in ginkgo's junit report; the suite-level
    report and setup nodes are left out."""
    outcomes: Counter[Outcome] = Counter()
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        if name.startswith("[") and "]" in name and not name.startswith("[It]"):
            continue
        if case.find("failure") is not None or case.find("error") is not None:
            status = "failed"
        elif case.find("skipped") is not None:
            status = "skipped"
        else:
            status = "passed"
        outcomes[(name, status)] += 1
    return outcomes


def suite_env(root_url: str, report_dir: Path) -> dict[str, str]:
    return {
        "OCI_ROOT_URL": root_url,
        "OCI_NAMESPACE": "conformance/a",
        "OCI_CROSSMOUNT_NAMESPACE": "conformance/b",
        "OCI_TEST_PULL": "1",
        "OCI_TEST_PUSH": "1",
        "OCI_TEST_CONTENT_DISCOVERY": "1",
        "OCI_TEST_CONTENT_MANAGEMENT": "1",
        "OCI_HIDE_SKIPPED_WORKFLOWS": "0",
        "OCI_REPORT_DIR": str(report_dir),
    }


def run_suites(suite: Path, targets: Mapping[str, str], workdir: Path) -> dict[str, SuiteRun]:
    """Run the suite against every target URL at once; each writes its own junit.xml."""
    started = {}
    for label, url in targets.items():
        report_dir = workdir / f"report-{label}"
        report_dir.mkdir()
        log = (workdir / f"suite-{label}.log").open("wb")
        process = subprocess.Popen(
            [str(suite)], cwd=report_dir, env=suite_env(url, report_dir),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        started[label] = (process, log, report_dir)
    runs = {}
    for label, (process, log, report_dir) in started.items():
        try:
            process.wait(SUITE_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
        output = (workdir / f"suite-{label}.log").read_text(errors="replace")
        junit = report_dir / "junit.xml"
        assert junit.is_file(), f"the suite against {label} wrote no junit.xml:\n{output[-4000:]}"
        runs[label] = SuiteRun(label, junit_outcomes(junit), output)
    return runs


@pytest.fixture(params=UPSTREAMS)
def release(request: pytest.FixtureRequest) -> Release:
    require_go_tools("conformance.test")
    return upstream_release(request.param)


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as services:
        yield services


def test_the_gateway_gives_the_registrys_conformance_results_in_every_mode(
    release: Release, stack: ExitStack, tmp_path: Path
) -> None:
    suite = go_tool("conformance.test")

    def fresh_registry(label: str) -> Registry:
        workdir = tmp_path / f"registry-{label}"
        workdir.mkdir()
        registry = Registry(workdir, RegistryConfig(allow_foreign_urls=True), release)
        stack.enter_context(registry)
        return registry

    targets = {"direct": fresh_registry("direct").url}
    gateways: dict[str, GatewayProcess] = {}
    for mode, (args, config) in MODES.items():
        workdir = tmp_path / f"gateway-{mode}"
        workdir.mkdir()
        gateway = GatewayProcess(workdir, fresh_registry(mode).url, args=args, config=config)
        stack.callback(gateway.stop)
        gateways[mode] = gateway.start()
        targets[mode] = gateway.url

    runs = run_suites(suite, targets, tmp_path)

    direct = runs["direct"]
    assert direct.totals == DIRECT_TOTALS[release.name], (
        f"the suite against {release.name} directly gave {direct.totals} (passed, failed, skipped), "
        f"not {DIRECT_TOTALS[release.name]}:\n{direct.output[-4000:]}"
    )
    differences = {}
    for mode in MODES:
        through = runs[mode].results
        if through != direct.results:
            differences[mode] = {
                "only direct": sorted((direct.results - through).elements()),
                "only through the gateway": sorted((through - direct.results).elements()),
            }
    assert not differences, "\n".join(
        f"{mode}: {difference}\n--- gateway log (tail)\n{gateways[mode].process.log_text()[-3000:]}"
        for mode, difference in differences.items()
    )
