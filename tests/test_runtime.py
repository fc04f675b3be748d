"""refine.runtime: the allocator settings every entry point applies, and their switch."""

import os
import subprocess
import sys

import pytest

PROBE = "from refine.runtime import tune_allocator; print(tune_allocator(), tune_allocator())"


def _probe(**env: str) -> str:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                            env={**os.environ, **env})
    return result.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt tuning applies to glibc Linux only")
def test_allocator_tuning_applies_once_on_glibc():
    assert _probe(REFINE_MALLOC_TUNING="1") == "True True"


def test_allocator_tuning_can_be_switched_off():
    assert _probe(REFINE_MALLOC_TUNING="0") == "False False"
