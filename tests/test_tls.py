"""TLS on the control channel and the HTTP port: certificates from a test CA (trustme), mutual
TLS, a plain-text port only when the config asks for one, and a reload that drops no session."""

from __future__ import annotations

import json
import ssl

import pytest
import trio
import trustme
from trio_websocket import open_websocket_url

from collector.device.client import RegistrationError, open_device
from collector.servers.tls import client_context

from .helpers import SECRETS, start_collector


@pytest.fixture
def ca():
    return trustme.CA()


@pytest.fixture
def certs(tmp_path, ca):
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(tmp_path / "server.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    return tmp_path


async def start(nursery, certs, **kw):
    return await start_collector(
        nursery,
        http_port=0,
        tls_cert=str(certs / "server.pem"),
        tls_key=str(certs / "server.pem"),
        **kw,
    )


async def test_a_device_registers_over_tls_and_plain_text_is_refused(nursery, certs):
    collector, _ = await start(nursery, certs, registration_timeout=2.0)
    ctx = client_context(str(certs / "ca.pem"))
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1], ssl_context=ctx
    ) as dev:
        await dev.send_readings({"t": 1.0}, ack=True)
    assert collector.statistics().devices["dev-1"].readings == 1
    # Plain text on the TLS port: the handshake fails, nothing else happens.
    with pytest.raises((RegistrationError, trio.BrokenResourceError, OSError, ValueError)):
        with trio.fail_after(5):
            async with open_device(
                "127.0.0.1", "dev-2", SECRETS["dev-2"], tcp_port=collector.tcp_address[1]
            ):
                pass
    # A device that does not trust the collector's certificate does not talk to it.
    with pytest.raises(trio.BrokenResourceError):
        async with open_device(
            "127.0.0.1", "dev-2", SECRETS["dev-2"], tcp_port=collector.tcp_address[1],
            ssl_context=client_context(None),
        ):  # fmt: skip
            pass
    await trio.sleep(0.1)
    assert collector.control.errors["tls_handshake"] >= 1


async def test_https_and_wss_with_the_same_certificate(nursery, certs):
    collector, _ = await start(nursery, certs)
    ctx = client_context(str(certs / "ca.pem"))
    port = collector.http_address[1]
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ctx)
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    answer = b""
    while chunk := await stream.receive_some(65536):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in answer
    async with open_websocket_url(f"wss://127.0.0.1:{port}/stream", ssl_context=ctx) as ws:
        assert json.loads(await ws.get_message())["type"] == "hello"
        [sub] = collector.hub.subscribers
        assert sub.writer is None  # over TLS the hub never writes for the sender
        await ws.send_message(json.dumps({"type": "subscribe"}))
        assert json.loads(await ws.get_message())["type"] == "snapshot"
        await ws.send_message(json.dumps({"type": "ping", "id": 1}))
        assert json.loads(await ws.get_message())["type"] == "pong"
    # over TLS every write goes through the TLS layer: the hub writes none itself
    assert collector.hub.messages_direct == 0


async def test_mutual_tls_refuses_a_device_without_a_client_certificate(nursery, certs, ca):
    collector, _ = await start(nursery, certs, tls_client_ca=str(certs / "ca.pem"))
    port = collector.tcp_address[1]
    with pytest.raises((trio.BrokenResourceError, RegistrationError)):
        with trio.fail_after(5):
            async with open_device(
                "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=port,
                ssl_context=client_context(str(certs / "ca.pem")),
            ):  # fmt: skip
                pass
    ctx = client_context(str(certs / "ca.pem"))
    ca.issue_cert("dev-1").configure_cert(ctx)
    async with open_device("127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=port, ssl_context=ctx):
        pass
    assert collector.statistics().devices["dev-1"].sessions == 1


async def test_a_plain_text_port_only_when_the_config_says_so(nursery, certs, caplog):
    collector, _ = await start(nursery, certs, tls_plaintext_tcp_port=0)
    plain = collector.control.plaintext_address
    assert plain is not None and "PLAIN TEXT" in caplog.text
    async with open_device("127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=plain[1]):
        pass
    assert collector.statistics().devices["dev-1"].sessions == 1


async def test_a_reload_takes_a_new_certificate_and_drops_no_session(nursery, certs, tmp_path):
    collector, _ = await start(nursery, certs)
    port = collector.tcp_address[1]
    old_ctx = client_context(str(certs / "ca.pem"))
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=port, ssl_context=old_ctx
    ) as dev:
        new_ca = trustme.CA()
        new_ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
            certs / "server.pem"
        )
        new_ca.cert_pem.write_to_path(tmp_path / "new-ca.pem")
        assert collector.reload() == ["TLS certificate"]
        # the session on the old certificate goes on ...
        await dev.send_readings({"t": 1.0}, ack=True)
        await dev.ping()
        assert dev.end_reason is None
        # ... new connections get the new one
        with pytest.raises(trio.BrokenResourceError):
            async with open_device(
                "127.0.0.1", "dev-2", SECRETS["dev-2"], tcp_port=port, ssl_context=old_ctx
            ):
                pass
        async with open_device(
            "127.0.0.1", "dev-2", SECRETS["dev-2"], tcp_port=port,
            ssl_context=client_context(str(tmp_path / "new-ca.pem")),
        ):  # fmt: skip
            pass
    assert collector.statistics().devices["dev-1"].readings == 1
    # A reload with a broken file keeps the current certificate.
    (certs / "server.pem").write_text("not a certificate")
    assert collector.reload() == []


def test_tls_config_needs_both_halves():
    from collector.config import Config, ConfigError

    with pytest.raises(ConfigError, match="both cert and key"):
        Config(tls_cert="x.pem")
    assert ssl.PROTOCOL_TLS_CLIENT  # the standard library's ssl is what TLS runs on
