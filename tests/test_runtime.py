"""refine.runtime: the allocator settings every entry point applies, and their switch; stage timing."""

import os
import subprocess
import sys
import time

import pytest

from refine.runtime import StageTimes, timed_stage

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


def test_stage_times_add_up_per_stage_and_survive_an_error():
    times = StageTimes("cpu")
    for _ in range(2):
        with times.stage("work"):
            time.sleep(0.01)  # a sleep never ends early, so the sum is at least 0.02 s
    with pytest.raises(RuntimeError), times.stage("failing"):
        raise RuntimeError("the stage's error propagates")
    with timed_stage(None, "untimed"):  # no timer: nothing recorded anywhere
        pass
    assert set(times.seconds) == {"work", "failing"}
    assert times.seconds["work"] >= 0.02 and times.seconds["failing"] >= 0
    assert times.stats() == {"work_seconds": times.seconds["work"], "failing_seconds": times.seconds["failing"]}
