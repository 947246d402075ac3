"""Only tests marked `integration` start real servers, so `-m "not integration"` starts none.

tests/conftest.py records, before each test's fixtures are set up, whether the test carries
the marker; every test utility that starts a server (HAPI, Redis, Chromium) calls `check` first.
"""

from __future__ import annotations

# The node id of the running test when it is NOT marked integration; None otherwise (and
# outside pytest, so these utilities also work from a shell).
unmarked_test: str | None = None


def check(server: str) -> None:
    """Fail the test that is about to start `server` without the integration marker."""
    if unmarked_test is not None:
        raise RuntimeError(
            f"{unmarked_test} starts {server} but is not marked integration"
            " (add pytestmark = pytest.mark.integration, or the marker on the test or its param)"
        )
