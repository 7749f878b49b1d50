"""A local S3 for the tests: moto's server on 127.0.0.1 at a free port, fake credentials, and a
raw client to set buckets up (the product's S3Store is read-only).

Test modules import the fixtures they use:

    from tests.s3server import fake_aws, s3_endpoint, s3_admin  # noqa: F401
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from moto.server import ThreadedMotoServer

REGION = "us-east-1"


class LocalS3:
    """moto in server mode, in a thread of this process, on loopback only."""

    def __init__(self) -> None:
        # Port 0: the OS picks a free port, so parallel runs never collide.
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint_url = ""

    def start(self) -> str:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self.endpoint_url

    def stop(self) -> None:
        self._server.stop()


@contextlib.contextmanager
def local_s3() -> Iterator[str]:
    """Run a LocalS3 for the duration of the block; yields its endpoint URL."""
    server = LocalS3()
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """The endpoint URL of a moto server shared by one test module."""
    with local_s3() as url:
        yield url


@pytest.fixture
def fake_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials in the standard variables, and no way to reach real ones: no profile,
    no config or credentials file, no instance metadata."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@contextlib.asynccontextmanager
async def admin_client(endpoint_url: str) -> AsyncIterator[Any]:
    """A plain aiobotocore S3 client on the local endpoint, for creating buckets and objects."""
    config = AioConfig(s3={"addressing_style": "path"})
    async with get_session().create_client("s3", region_name=REGION, endpoint_url=endpoint_url,
                                           config=config) as client:
        yield client


@pytest.fixture
async def s3_admin(s3_endpoint: str, fake_aws: None) -> AsyncIterator[Any]:
    """An admin client on the module's moto server (with fake credentials set)."""
    async with admin_client(s3_endpoint) as client:
        yield client
