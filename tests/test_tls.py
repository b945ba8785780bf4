"""TLS against a real broker (uvloop) with a CA and certificates made at run time
(trustme): a good handshake on both ports and both clients, a wrong CA refused, mutual TLS
with and without a client certificate, and plain TCP to a TLS port refused cleanly."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from bench._sluice import SluiceBlockingConnection, SluiceServer
from client import AsyncClient, Client, Worker
from client.errors import BrokerUnavailable, ConnectionClosed
from tests.conftest import REPO_ROOT, BrokerProcess, frame, start_broker, stop_broker


class Pki:
    """A CA, the broker's certificate for 127.0.0.1 and localhost, and a client's."""

    def __init__(self, where: Path) -> None:
        self.ca = trustme.CA()
        self.where = where
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())
        self.cert_file = self._write(
            "server.pem", b"".join(b.bytes() for b in server.cert_chain_pems)
        )
        self.key_file = self._write("server.key", server.private_key_pem.bytes())
        self.client = self.ca.issue_cert("worker@example.test")

    def _write(self, name: str, data: bytes) -> str:
        path = self.where / name
        path.write_bytes(data)
        return str(path)

    def broker_args(self, *, mutual: bool = False) -> list[str]:
        args = ["--tls-cert", self.cert_file, "--tls-key", self.key_file]
        return [*args, "--tls-client-ca", self.ca_file] if mutual else args

    def client_context(self, *, with_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if with_cert:
            self.client.configure_cert(context)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_broker(pki: Pki) -> Iterator[BrokerProcess]:
    running = start_broker(
        Path(pki.where) / "tls.log", "--in-memory", *pki.broker_args(), http=True
    )
    yield running
    stop_broker(running)


def test_both_clients_and_https_over_tls(tls_broker: BrokerProcess, pki: Pki) -> None:
    with Client(tls_broker.host, tls_broker.port, tls=pki.client_context(), timeout=5) as client:
        client.put("tls.jobs", b"secret")
        (message,) = client.reserve("tls.jobs")
        assert message.body == b"secret"

    async def run_async() -> bytes:
        url = f"sluices://{tls_broker.host}:{tls_broker.port}"
        async with AsyncClient(url=url, tls=pki.client_context(), timeout=5) as client:
            await client.put("tls.async", b"also secret")
            (message,) = await client.reserve("tls.async")
            return message.body

    assert asyncio.run(run_async()) == b"also secret"
    url = f"https://{tls_broker.host}:{tls_broker.http_port}/api/v1/queues"
    with urllib.request.urlopen(url, context=pki.client_context(), timeout=5) as response:
        assert "tls.jobs" in {q["name"] for q in json.loads(response.read())["queues"]}


def test_a_sluices_url_means_tls_and_checks_the_ca(tls_broker: BrokerProcess) -> None:
    url = f"sluices://{tls_broker.host}:{tls_broker.port}"
    with pytest.raises(BrokerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        Client(url=url, timeout=5).connect()  # the system's CAs do not know trustme's
    with pytest.raises(BrokerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        Client(url=url, tls=_other_ca(), timeout=5).connect()
    tls_broker.assert_alive()
    assert "Traceback" not in tls_broker.log()


def _other_ca() -> ssl.SSLContext:
    context = ssl.create_default_context()
    trustme.CA().configure_trust(context)
    return context


def test_plain_tcp_to_the_tls_port_is_refused_cleanly(tls_broker: BrokerProcess, pki: Pki) -> None:
    with socket.create_connection((tls_broker.host, tls_broker.port), timeout=5) as plain:
        plain.sendall(frame([1, "hello", {"version": 1}]))
        received = b""
        while chunk := plain.recv(1024):  # then the broker closes (within the timeout)
            received += chunk
        assert b"sluice" not in received  # no hello reply: at most a TLS alert
    with pytest.raises((BrokerUnavailable, ConnectionClosed)):  # no hello over plain TCP
        Client(tls_broker.host, tls_broker.port, tls=False, timeout=2).ping()
    with Client(tls_broker.host, tls_broker.port, tls=pki.client_context(), timeout=5) as client:
        assert client.ping() > 0  # the broker is none the worse
    assert "Traceback" not in tls_broker.log()


def test_mutual_tls_needs_a_client_certificate(pki: Pki, tmp_path: Path) -> None:
    running = start_broker(tmp_path / "mtls.log", "--in-memory", *pki.broker_args(mutual=True))
    try:
        context = pki.client_context(with_cert=True)
        with Client(running.host, running.port, tls=context, timeout=5) as client:
            client.put("mtls.jobs", b"m")
            assert client.stats("mtls.jobs")["ready"] == 1
        without = pki.client_context()
        with pytest.raises((BrokerUnavailable, ConnectionClosed)):
            Client(running.host, running.port, tls=without, timeout=5).ping()
        running.assert_alive()
    finally:
        stop_broker(running)


def test_tls_flags_are_checked_at_start(pki: Pki, tmp_path: Path) -> None:
    for args, why in (
        (["--tls-key", pki.key_file], "need --tls-cert"),
        (["--tls-cert", str(tmp_path / "missing.pem")], "cannot load the TLS certificate"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "broker", "--in-memory", "--port", "0", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert done.returncode == 1 and re.search(why, done.stderr), done.stderr
        assert "Traceback" not in done.stderr


def test_the_cli_worker_and_bench_speak_tls(
    tls_broker: BrokerProcess, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sluices://{tls_broker.host}:{tls_broker.port}"
    cli = [sys.executable, "-m", "client.cli", "--url", url]
    done = subprocess.run(
        [*cli, "--tls-ca", pki.ca_file, "put", "tls.cli", "from the cli"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    refused = subprocess.run(
        [*cli, "stats", "tls.cli"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20
    )
    assert refused.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr
    assert "--tls-ca" in refused.stderr

    handled: list[bytes] = []
    worker = Worker(
        "tls.cli",
        lambda job: handled.append(job.body) or worker.stop(),
        url=url,
        tls=pki.client_context(),
    )
    assert worker.settings.url == url
    worker.run()
    assert handled == [b"from the cli"]

    monkeypatch.setenv("SLUICE_TLS_CA", pki.ca_file)
    server = SluiceServer(url=url)
    connection = SluiceBlockingConnection(server.endpoint())
    connection.open()
    try:
        connection.put("tls.bench", [b"b"], 0, 0)
        assert [body for body, _ in connection.reserve(["tls.bench"], 1, 0)] == [b"b"]
    finally:
        connection.close()


def test_the_cli_says_a_client_certificate_may_be_missing(pki: Pki, tmp_path: Path) -> None:
    running = start_broker(tmp_path / "mtls.log", "--in-memory", *pki.broker_args(mutual=True))
    try:
        url = f"sluices://{running.host}:{running.port}"
        cli = [sys.executable, "-m", "client.cli", "--url", url, "--tls-ca", pki.ca_file]
        done = subprocess.run(
            [*cli, "queues"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20
        )
        assert done.returncode == 1 and "--tls-cert if it wants one" in done.stderr
        cert = tmp_path / "client.pem"  # its key in the same file
        pki.client.private_key_and_cert_chain_pem.write_to_path(str(cert))
        done = subprocess.run(
            [*cli, "--tls-cert", str(cert), "queues"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert done.returncode == 0, done.stderr
    finally:
        stop_broker(running)


def test_tls_context_as_the_readme_shows(pki: Pki, tmp_path: Path) -> None:
    from sluice import tls_context

    running = start_broker(tmp_path / "mtls.log", "--in-memory", *pki.broker_args(mutual=True))
    try:
        cert, key = tmp_path / "worker.pem", tmp_path / "worker.key"
        pki.client.cert_chain_pems[0].write_to_path(str(cert))
        pki.client.private_key_pem.write_to_path(str(key))
        context = tls_context(pki.ca_file, str(cert), str(key))
        assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
        url = f"sluices://localhost:{running.port}"  # the certificate names localhost too
        with Client(url=url, tls=context, timeout=5) as client:
            assert client.ping() > 0
        with pytest.raises((BrokerUnavailable, ConnectionClosed)):
            Client(url=url, tls=tls_context(pki.ca_file), timeout=5).ping()
    finally:
        stop_broker(running)


def test_a_silent_socket_on_the_tls_port_is_closed_by_the_hello_timeout(
    pki: Pki, tmp_path: Path
) -> None:
    args = ("--in-memory", "--hello-timeout", "0.5", *pki.broker_args())
    running = start_broker(tmp_path / "broker.log", *args)
    try:
        with socket.create_connection((running.host, running.port), timeout=5) as silent:
            assert silent.recv(1024) == b""  # closed within the timeout, not the 5 s read
    finally:
        stop_broker(running)
