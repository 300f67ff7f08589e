"""The installed size of the running environment (its site-packages, links not followed),
which the fresh-environment checks of `make test` print: scripts/onnx_smoke.py and
scripts/openvino_smoke.py import it from beside them."""

import os
import sysconfig


def site_packages_mb() -> float:
    site = sysconfig.get_paths()["purelib"]
    size = sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(site)
        for name in names
        if not os.path.islink(os.path.join(root, name))
    )
    return size / 1e6
