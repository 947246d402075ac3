"""tools/hapi_server.py says what it does while HAPI builds and starts (no TTY: timed lines)."""

from __future__ import annotations

import io
import threading

import pytest

from tools import hapi_server


def test_without_a_terminal_it_says_the_step_then_the_seconds_then_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hapi_server, "PLAIN_PROGRESS_EVERY_S", 0.01)
    out = io.StringIO()
    ticked = threading.Event()

    class Watch(io.StringIO):
        def write(self, text: str) -> int:
            if "... " in text and text.rstrip().endswith(" s"):
                ticked.set()
            return out.write(text)

    with hapi_server.progress(Watch(), hapi_server.WAIT_PROGRESS):
        assert ticked.wait(30)  # the body runs until a timed line has been written
    lines = out.getvalue().splitlines()
    assert lines[0] == f"{hapi_server.WAIT_PROGRESS}..."
    assert lines[1].startswith(f"{hapi_server.WAIT_PROGRESS}... ") and lines[1].endswith(" s")
    assert lines[-1].startswith(f"{hapi_server.WAIT_PROGRESS}: done in ")


def test_a_failed_step_does_not_say_done() -> None:
    out = io.StringIO()
    with pytest.raises(RuntimeError), hapi_server.progress(out, hapi_server.BUILD_PROGRESS):
        raise RuntimeError("mvn failed")
    assert "done in" not in out.getvalue()


def test_no_stream_no_output() -> None:
    with hapi_server.progress(None, hapi_server.BUILD_PROGRESS):
        pass
