"""How often a role of a service run may be restarted: MAX_RESTARTS_PER_ROLE times within RESTART_WINDOW_S."""

from __future__ import annotations

from collections import deque

__all__ = ["MAX_RESTARTS_PER_ROLE", "RESTART_WINDOW_S", "RestartWindow"]

MAX_RESTARTS_PER_ROLE = 20
# Restarts count against MAX_RESTARTS_PER_ROLE for this long: a role failing 20 times within an hour is
# broken, while one preempted now and then over a week-long run is not.
RESTART_WINDOW_S = 3600.0


class RestartWindow:
    """When a role was restarted, over the last `window_s` seconds."""

    def __init__(self, window_s: float = RESTART_WINDOW_S) -> None:
        self.window_s = window_s
        self.times: deque[float] = deque()

    def add(self, now: float) -> int:
        """Count a restart at `now` (time.monotonic()); returns the restarts within the window."""
        self.times.append(now)
        while self.times[0] <= now - self.window_s:
            self.times.popleft()
        return len(self.times)
