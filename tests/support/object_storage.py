"""A real S3-compatible server for the tests: moto's, as its own process on a free port of 127.0.0.1.

The batch side reaches it the way it reaches AWS, MinIO or Ceph: through the standard AWS variables
(``environment``), with OVERNIGHT_DATA_DIR=s3://bucket/prefix. Each test makes its own bucket.

A test module gets the ``s3`` fixture (one server per module) by importing it:
``from tests.support.object_storage import s3_fixture as s3_fixture`` (the redundant alias tells ruff the
import is meant, though only pytest uses it).
"""

import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import s3fs

from tests.support.commands import free_port

MOTO_SERVER = Path(sys.executable).with_name("moto_server")


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str

    def environment(self) -> dict[str, str]:
        """What a process needs to use this server as its object store (moto accepts any key)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "overnight-test",
            "AWS_SECRET_ACCESS_KEY": "overnight-test",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def filesystem(self) -> s3fs.S3FileSystem:
        """A client of its own, to look at the bucket from outside the code under test."""
        return s3fs.S3FileSystem(
            key="overnight-test",
            secret="overnight-test",
            endpoint_url=self.endpoint_url,
            use_listings_cache=False,
            skip_instance_cache=True,
        )

    def new_bucket(self) -> str:
        bucket = f"overnight-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(bucket)
        return bucket


@contextmanager
def s3_server(ready_timeout: float = 30) -> Iterator[S3Server]:
    """moto's server, started for the block and stopped after it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile(mode="w+") as output:
        process = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], stdout=output, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + ready_timeout
            while True:
                if process.poll() is not None:
                    output.seek(0)
                    raise RuntimeError(f"moto_server exited {process.returncode}:\n{output.read()[-3000:]}")
                try:
                    if httpx.get(f"{endpoint}/moto-api/", timeout=1).status_code < 500:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer on {endpoint} within {ready_timeout} s")
                time.sleep(0.1)
            yield S3Server(endpoint)
        finally:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture(scope="module", name="s3")
def s3_fixture() -> Iterator[S3Server]:
    """moto's server for the tests of one module."""
    with s3_server() as server:
        yield server
