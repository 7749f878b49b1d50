"""A local S3 for the sandbox: moto in server mode on loopback, filled with boto3 (moto's own
dependency). The tool itself reads it through crawler.s3 like any S3 endpoint."""

from __future__ import annotations

import os
import socket
from typing import Any

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "sandbox", "AWS_SECRET_ACCESS_KEY": "sandbox",
                    "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._server: Any = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def __enter__(self) -> LocalS3:
        import logging
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request is noise here
        for k, v in FAKE_CREDENTIALS.items():
            os.environ.setdefault(k, v)
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    def upload(self, bucket: str, objects: list[tuple[str, bytes]]) -> None:
        """Create the bucket and put the objects, in order (LastModified follows it)."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                              aws_access_key_id="sandbox", aws_secret_access_key="sandbox")
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)
        for key, body in objects:
            client.put_object(Bucket=bucket, Key=key, Body=body)
