"""`make demo` runs end to end and tells what happened: foreign blobs dropped, none in the registry."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.processes import require_binaries

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_demo_tells_the_story() -> None:
    require_binaries("docker-registry")
    result = subprocess.run(
        [sys.executable, ROOT / "demo/demo.py"], capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout

    assert result.returncode == 0, output + result.stderr
    dropped = re.findall(r"foreign layer +(sha256:[0-9a-f]{12}) -> 201 Created, but dropped", output)
    assert len(dropped) == 2
    assert f"none of the 2 foreign blobs ({', '.join(dropped)})" in output
    stored = re.findall(r"^   (sha256:[0-9a-f]{12})  \w+$", output, re.MULTILINE)
    assert stored and not set(stored) & set(dropped)
    assert re.search(r'foreign_layer_proxy_decisions_total\{action="dropped",rule="default"\} +0 -> 2$', output, re.MULTILINE)
    assert output.count("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip  windows/base (manifest-put") == 2
