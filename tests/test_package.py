"""The package's names: the public API loads on first use, and its subpackages are attributes as any package's."""

from __future__ import annotations

import subprocess
import sys


def test_subpackages_are_attributes_of_the_package_after_a_plain_import():
    """README names `loramix.io.export.mean_gate` and the like: they resolve after `import loramix` alone, and an
    unknown name is still an AttributeError naming it."""
    code = (
        "import loramix\n"
        "print(loramix.io.export.mean_gate.__name__, sorted(loramix.experts.EXPERT_KINDS), callable(loramix.inject))\n"
        "try:\n    loramix.nope\nexcept AttributeError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [
        "mean_gate ['adapter', 'lora'] True",
        "module 'loramix' has no attribute 'nope'",
    ]
