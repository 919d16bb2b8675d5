"""The benchmark's report (bench/run.py): targets applied to medians, ratios, tables, the READMEs' markers.
Only the pure report logic; the benchmark itself never runs in the test suite."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


bench = load_bench()


def results_with(figure: str, samples: dict[str, list[float]], phase: str = "capacity") -> Any:
    results = bench.Results(bench.QUICK, phase=phase)
    for target, values in samples.items():
        for value in values:
            results.add(figure, target, value)
    return results


@pytest.mark.parametrize(
    ("samples", "check", "target", "met"),
    [
        pytest.param({"gateway": [90, 100, 300], "nginx": [20, 21, 5]}, bench.at_most_nginx(5), "<= 5 x nginx tuned",
                     True, id="medians-not-means: 100 us against 20 us is 5x"),
        pytest.param({"gateway": [101], "nginx": [20]}, bench.at_most_nginx(5), "<= 5 x nginx tuned", False,
                     id="just-over-5x"),
        pytest.param({"gateway": [101]}, bench.at_most_nginx(5), "<= 5 x nginx tuned", None, id="no-nginx-no-verdict"),
        pytest.param({"gateway": [0.5], "nginx": [0.5]}, bench.at_most_nginx(1), "<= nginx tuned", True,
                     id="cpu-per-gib-equal-to-nginx"),
        pytest.param({"gateway": [1000], "gateway-workers": [1300]}, bench.scales_with_workers(1.3),
                     ">= 1.3 x 1 worker", True, id="workers-scale"),
        pytest.param({"gateway": [1000], "gateway-workers": [1020]}, bench.scales_with_workers(1.3),
                     ">= 1.3 x 1 worker", False, id="workers-do-not-scale"),
        pytest.param({"gateway": [99.9]}, bench.below(100, "MiB"), "< 100 MiB", True, id="under-the-memory-limit"),
        pytest.param({"gateway": [100]}, bench.below(100, "MiB"), "< 100 MiB", False, id="at-the-memory-limit"),
    ],
)
def test_a_target_applies_to_the_medians_of_a_run(
    samples: dict[str, list[float]], check: Any, target: str, met: bool | None
) -> None:
    row = results_with("figure", samples).row("figure", "us", check)
    assert (row.target, row.met) == (target, met)


def test_each_phase_gets_a_table_with_the_columns_and_ratios_it_measured() -> None:
    results = results_with("capacity cpu", {"nginx": [20], "gateway": [100], "gateway-workers": [110]})
    results.row("capacity cpu", "us", bench.at_most_nginx(5), "own CPU")
    results.phase = "memory"
    results.add("peak", "gateway", 60.0)
    results.row("peak", "MiB", bench.below(100, "MiB"), "peak RSS")
    capacity, memory = bench.table(results.rows).split("\n\n**")
    assert capacity.splitlines()[2:] == [
        (
            f"| figure | unit | nginx tuned | gateway | gateway x{bench.CORES} workers | gateway/nginx "
            "| gateway-workers/nginx | gateway-workers/gateway | target | met |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
        "| own CPU | us | 20.0 | 100.0 | 110.0 | 5.00 | 5.50 | 1.10 | <= 5 x nginx tuned | yes |",
    ]
    assert memory.splitlines()[2:] == [
        "| figure | unit | gateway | target | met |",
        "|---|---|---|---|---|",
        "| peak RSS | MiB | 60.0 | < 100 MiB | yes |",
    ]


def test_the_readme_table_shows_ratios_to_nginx_in_the_order_of_its_keys() -> None:
    results = results_with("download cpu", {"nginx": [0.5], "gateway": [0.4]}, phase="large")
    results.row("download cpu", "s/GiB", bench.at_most_nginx(1), "CPU per GiB, download")
    for target, value in {"nginx": 30_000.0, "gateway": 3_000.0, "gateway-workers": 4_500.0}.items():
        results.add("capacity manifest rps", target, value)
    results.row("capacity manifest rps", "req/s", bench.scales_with_workers(1.3), "manifest GET: requests/s")
    results.add("known rps", "1M", 950.0)
    results.add("known rps", "empty", 1000.0)
    results.phase = "known"
    bench.million_rows(results, "1M", 1_000_000)
    document = {"rows": [row.as_dict() for row in results.rows]}
    lines = bench.performance_table(document)
    assert lines[2:5] == [
        (
            f"| manifest GET: requests/s | 3,000 req/s | 30,000 req/s | 0.10 | >= 1.3 x 1 worker (x{bench.CORES} "
            "workers: 1.50 x 1 worker) | yes |"
        ),
        "| CPU per GiB, download | 0.40 s/GiB | 0.50 s/GiB | 0.80 | <= nginx tuned | yes |",
        (
            "| requests/s with 1M known digests while digests are learned | 950 req/s | - | - "
            "| >= 0.95 x empty store (empty store: 1,000 req/s) | yes |"
        ),
    ]
    assert len(lines) == 5  # figures not measured are left out


def test_only_the_text_between_the_markers_is_replaced(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- performance:start -->\nold\ntable\n<!-- performance:end -->\nafter\n")
    assert bench.replace_between(readme, bench.PERFORMANCE_START, bench.PERFORMANCE_END, ["new"])
    assert readme.read_text() == "before\n<!-- performance:start -->\nnew\n<!-- performance:end -->\nafter\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not bench.replace_between(plain, bench.PERFORMANCE_START, bench.PERFORMANCE_END, ["new"])
    assert plain.read_text() == "no markers\n"
