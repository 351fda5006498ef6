"""A real S3-protocol server for tests: moto's server mode (``python -m moto.server``) on a free loopback port.

It speaks S3's HTTP protocol (SigV4-signed requests, multipart uploads, ranged GETs, user metadata), so
the object store under test uses its real client, as against AWS or MinIO. Its own process, so a test's
event loop and the server never share a GIL-bound thread.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import httpx

from tests.support.ports import free_port
from tests.support.until import wait_until

ACCESS_KEY_ID = "modelplex-test"
SECRET_ACCESS_KEY = "modelplex-test-secret"
REGION = "us-east-1"


class S3Server:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._up, timeout=60, interval=0.1)
        return self

    def _up(self) -> bool:
        assert self.process is not None and self.process.poll() is None, "moto.server exited"
        try:
            return httpx.get(f"{self.endpoint_url}/moto-api/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self):
        """boto3 (moto's own dependency), for checks beneath the store: buckets, pending multipart uploads."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=REGION, aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )

    def new_bucket(self) -> str:
        name = f"modelplex-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, prefix: str, bucket: str) -> dict[str, str]:
        """A service's settings (``MODELPLEX_<SERVICE>_``) for an ``s3`` object store on this server."""
        return {
            f"{prefix}OBJECT_STORE": "s3",
            f"{prefix}OBJECT_STORE_BUCKET": bucket,
            f"{prefix}OBJECT_STORE_ENDPOINT_URL": self.endpoint_url,
            f"{prefix}OBJECT_STORE_REGION": REGION,
            f"{prefix}OBJECT_STORE_ACCESS_KEY_ID": ACCESS_KEY_ID,
            f"{prefix}OBJECT_STORE_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        }

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
