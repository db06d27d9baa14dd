"""The runtime must not pull torch, transformers, modelopt or ray: it runs on devices without them."""

import subprocess
import sys

import pytest

FORBIDDEN = ("torch", "transformers", "modelopt", "ray")


@pytest.mark.parametrize("module", ["egm_edge", "egm_edge.runtime", "egm_edge.grounding", "egm_edge.cli", "egm_edge.sweep.cluster"])
def test_import_pulls_no_heavy_framework(module):
    code = (
        f"import sys, pkgutil, importlib; import {module} as m\n"
        "if m.__name__ == 'egm_edge.runtime':\n"
        "    for info in pkgutil.walk_packages(m.__path__, 'egm_edge.runtime.'):\n"
        "        importlib.import_module(info.name)\n"
        f"bad = [n for n in {FORBIDDEN!r} if n in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing {module} pulled in: {out}"
