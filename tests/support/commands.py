"""The real `overnight` command and the lookup service, run as a user would run them."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

OVERNIGHT = Path(sys.executable).with_name("overnight")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def overnight(
    *args: str, env: dict[str, str], check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the real `overnight` command, as a user would."""
    result = subprocess.run([str(OVERNIGHT), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"overnight {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def overnight_env(database_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERNIGHT_")}
    return {**env, "OVERNIGHT_DATABASE_URL": database_url, "OVERNIGHT_DATA_DIR": str(data_dir), **extra}


@contextmanager
def running_service(env: dict[str, str], *args: str, ready_timeout: float = 30) -> Iterator[str]:
    """`overnight serve` on a free port of 127.0.0.1; yields its base URL once /readyz answers 200."""
    with running_server(env, "serve", "/readyz", *args, ready_timeout=ready_timeout) as base:
        yield base


@contextmanager
def running_server(
    env: dict[str, str], command: str, probe: str, *args: str, ready_timeout: float = 30
) -> Iterator[str]:
    """`overnight <command>` (serve, console) on a free port of 127.0.0.1; yields its base URL once
    `probe` answers 200, and stops it after the block."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # A file, not a pipe: nobody reads the server's log while it runs, and a full pipe would stall it.
    with tempfile.TemporaryFile(mode="w+") as output:
        process = subprocess.Popen(
            [str(OVERNIGHT), command, "--port", str(port), *args], env=env, stdout=output, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + ready_timeout
            while True:
                if process.poll() is not None:
                    output.seek(0)
                    raise AssertionError(f"overnight {command} exited {process.returncode}:\n{output.read()[-3000:]}")
                try:
                    if httpx.get(f"{base}{probe}", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"overnight {command} was not ready within {ready_timeout}s")
                time.sleep(0.2)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def serving_app(app: Any) -> Iterator[str]:
    """An ASGI app under uvicorn on a free localhost port, in a thread with its own event loop; yields its URL.

    Leaving the block runs the app's shutdown (lifespan) before returning.
    """
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", proxy_headers=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
