"""Fixtures shared by the studies tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from report_support import mlflow_server


@pytest.fixture(scope="session")
def mlflow_server_url(tmp_path_factory) -> Iterator[str]:
    """One real `mlflow server` for the server and browser tests (starting one takes 10-20 s on 2 busy cores); each
    module logs to an experiment of its own, so neither sees the other's runs."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url
