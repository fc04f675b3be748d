"""How often a role may be restarted (services.restart_limit): restarts count within the window only."""

from __future__ import annotations

from services.restart_limit import RestartWindow


def test_restarts_count_within_the_window_only() -> None:
    window = RestartWindow(window_s=3600)
    assert [window.add(now) for now in (0, 10, 20)] == [1, 2, 3]
    assert window.add(3605) == 3  # the restart at 0 left the window
    assert window.add(3700) == 2  # ... and those at 10 and 20
    assert window.add(7400) == 1
