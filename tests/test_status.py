"""How `farm status` names a worker's state from its registry row, leases and heartbeat."""

import pytest

from farm.status import _shown_state


@pytest.mark.parametrize(
    ("state", "live_lease", "stale", "shown"),
    [
        ("ready", True, False, "ready"),
        ("busy", True, False, "busy"),
        ("ready", False, True, "lost"),  # leases expired, not reaped yet
        ("busy", False, False, "lost"),
        ("starting", False, False, "starting"),  # still loading, still beating
        ("starting", False, True, "lost"),  # died while loading
        ("lost", False, True, "lost"),
    ],
)
def test_a_workers_shown_state(state, live_lease, stale, shown):
    assert _shown_state(state, live_lease, stale) == shown
