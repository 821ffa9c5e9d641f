"""A real MLflow tracking server (SQLite backend, local artifact root) on 127.0.0.1, one per test session."""

from __future__ import annotations

import pytest

from tests.mlflow_server import running_mlflow_server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """(URI, server folder); the database and artifacts live in a session temp folder; stopped at the end."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with running_mlflow_server(root) as uri:
        yield uri, root
