"""Write a small Windows-like image for the README's worked example (fixed seed: the same bytes every time).

    python demo/example_image.py windows-image
writes windows-image/ (a skopeo `dir:` folder, what `foreign-layer-proxy learn dir:./windows-image` reads) and
windows-image.tar (an OCI archive tagged 1, what `ctr images import` reads). Two of its three layers are
foreign (docker foreign media type, with `urls`), as Windows base layers are; their bytes are random.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's image builder

from support.images import build_image, write_dir, write_oci_archive

SEED = 14
TAG = "1"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", type=Path, help="writes NAME/ and NAME.tar")
    name = parser.parse_args().name
    image = build_image(SEED, foreign=2, os="windows")
    write_dir(image, name)
    write_oci_archive(image, name.with_name(f"{name.name}.tar"), tag=TAG)
    print(f"{name}/ and {name}.tar: {image.manifest_digest}, tag {TAG}; foreign layers:")
    for layer in image.foreign_layers:
        print(f"  {layer.digest} {layer.size} bytes, urls {', '.join(layer.urls)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
