"""The deploy-apply tests' real parts: a private dockerd (started once per module, stopped after) with a
busybox image made by `docker import`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.support_docker import busybox_image, docker_engine


@pytest.fixture(scope="module")
def engine():
    # a short root: the engine's unix socket path must stay under 108 bytes
    with tempfile.TemporaryDirectory(prefix="idpd-", dir="/tmp") as root, docker_engine(Path(root)) as e:
        busybox_image(e.client())
        yield e


@pytest.fixture
def client(engine):
    c = engine.client()
    yield c
    for ct in c.containers.list(all=True):
        ct.remove(force=True)
    c.close()


@pytest.fixture
def sshd(tmp_path):
    from tests.support_sshd import sshd_server

    with sshd_server(tmp_path / "sshd") as s:
        yield s
