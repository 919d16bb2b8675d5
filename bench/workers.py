"""1 against N workers (`server.workers`) is now the capacity phase of run.py:

    .venv/bin/python bench/run.py --phases capacity

What one-off scripts took from here lives in harness.py: `static_upstream` (nginx answering like a
registry, and `200 {}` to anything else) and `gateway_cpu` (supervisor and workers).
"""

from __future__ import annotations

from harness import gateway_cpu, static_upstream

__all__ = ["gateway_cpu", "static_upstream"]

if __name__ == "__main__":
    raise SystemExit(__doc__)
