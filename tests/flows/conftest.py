"""Fixtures of the command-line tests (test_serve.py has its own ``no_server``: no carrot
server, a spec file in the working directory)."""

from __future__ import annotations

import pytest


@pytest.fixture
def no_server(monkeypatch):
    """Fail loudly if a command gets as far as starting a Prefect server or a flow."""
    from prefect.server.api.server import SubprocessASGIServer

    import flows.runtime

    def tripwire(*_a, **_k):
        raise AssertionError("a Prefect server or flow was started for bad input")

    monkeypatch.setattr(flows.runtime, "flow_settings", tripwire)
    monkeypatch.setattr(SubprocessASGIServer, "start", tripwire)
