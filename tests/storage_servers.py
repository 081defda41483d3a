"""Real object-store servers for tests: moto (S3), gcp-storage-emulator (GCS), azurite.

Each server runs as its own process on 127.0.0.1 and a free port, and is stopped by
its PID. A :class:`Backend` says how to reach it: the URL of a fresh bucket and the
``storage_options`` a user would put in their config.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

# gcsfs probes every bucket for hierarchical namespaces, which the emulator does not
# answer (a 60 s timeout per bucket). Read when gcsfs is imported, so set it first.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

__all__ = ["AZURITE_ACCOUNT_KEY", "Backend", "ServerProcess", "azurite_command", "start_server"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Azurite's published development account key (not a secret: every azurite has it).
AZURITE_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


@dataclass
class ServerProcess:
    """A server started by :func:`start_server`; :meth:`stop` ends it by its PID."""

    name: str
    process: subprocess.Popen
    port: int
    log: str

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


@dataclass
class Backend:
    """One object store, as a test (and a user's config) sees it.

    Attributes:
        name: ``s3``, ``gcs`` or ``azure``.
        protocol: the URL scheme (``s3``, ``gs``, ``az``).
        storage_options: what a user puts under ``trainer.storage_options``.
        env: environment variables a subprocess needs besides ``storage_options``.
    """

    name: str
    protocol: str
    storage_options: dict
    env: dict = field(default_factory=dict)

    def filesystem(self):
        import fsspec

        return fsspec.filesystem(self.protocol, skip_instance_cache=True, **self.storage_options)

    def new_bucket(self) -> str:
        """Create an empty bucket (container) and return its URL, ``s3://name``."""
        bucket = f"test-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(bucket)
        return f"{self.protocol}://{bucket}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(name: str, command: list[str], port: int, log_dir: str) -> ServerProcess:
    """Start ``command`` and wait until it accepts connections on ``port``.

    Raises:
        RuntimeError: it exited or did not listen within 60 s; the message holds its log.
    """
    log = os.path.join(log_dir, f"{name}.log")
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=log_dir)
    server = ServerProcess(name, process, port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    with open(log) as f:
        raise RuntimeError(f"{name} did not start ({' '.join(command)}):\n{f.read()[-2000:]}")


def moto_command(port: int) -> list[str]:
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def gcs_command(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gcp_storage_emulator",
        "start",
        "--host=127.0.0.1",
        f"--port={port}",
        "--in-memory",
    ]


def azurite_command(port: int) -> list[str] | None:
    """The azurite-blob command line, or None when azurite is not installed.

    Looked up in ``$AZURITE_BLOB`` (tox sets it), ``node_modules/.bin`` of the
    repository, then ``PATH``.
    """
    candidates = [
        os.environ.get("AZURITE_BLOB"),
        os.path.join(REPO, "node_modules", ".bin", "azurite-blob"),
        shutil.which("azurite-blob"),
    ]
    binary = next((c for c in candidates if c and os.path.exists(c)), None)
    if binary is None:
        return None
    return [
        binary,
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(port),
        "--inMemoryPersistence",
        "--skipApiVersionCheck",
        "--disableTelemetry",
        "--silent",
    ]


def s3_backend(port: int) -> Backend:
    # Any key works with moto; anonymous access does not. No region: us-east-1 on the
    # client makes moto reject bucket creation with a location constraint.
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
    }
    return Backend("s3", "s3", options)


def gcs_backend(port: int) -> Backend:
    endpoint = f"http://127.0.0.1:{port}"
    options = {"token": "anon", "project": "test", "endpoint_url": endpoint}
    return Backend("gcs", "gs", options, env={"STORAGE_EMULATOR_HOST": endpoint})


def azure_backend(port: int) -> Backend:
    connection_string = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={AZURITE_ACCOUNT_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    )
    return Backend("azure", "az", {"connection_string": connection_string})
