"""The review page's server settings: a trusted proxy's client address reaches the login brake."""

from __future__ import annotations

import http.client
import threading

import pytest
from waitress.server import create_server

from screening.web.serve import ServeError, proxy_options


def _remote_addr(options: dict, headers: dict[str, str]) -> str:
    """REMOTE_ADDR as a WSGI app behind waitress (run here on an ephemeral port) sees it."""

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["REMOTE_ADDR"].encode()]

    server = create_server(app, host="127.0.0.1", port=0, clear_untrusted_proxy_headers=True, **options)
    closing = threading.Event()

    def run() -> None:
        try:
            server.run()
        except (OSError, ValueError):  # the socket closed under the loop's select by close() below (EBADF)
            if not closing.is_set():
                raise

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.effective_port, timeout=10)
        conn.request("GET", "/", headers=headers)
        return conn.getresponse().read().decode()
    finally:
        closing.set()
        server.close()  # the daemon thread's loop goes on with waitress's trigger alone; it ends with the process


def test_without_a_trusted_proxy_a_forwarded_address_is_ignored():
    assert proxy_options(None) == {}
    assert _remote_addr(proxy_options(None), {"X-Forwarded-For": "10.1.2.3"}) == "127.0.0.1"


def test_a_trusted_proxy_passes_on_the_clients_address():
    assert _remote_addr(proxy_options("127.0.0.1"), {"X-Forwarded-For": "10.1.2.3"}) == "10.1.2.3"


def test_a_proxy_that_is_not_an_ip_address_is_refused_with_advice():
    with pytest.raises(ServeError, match="not an IP address.*127.0.0.1"):
        proxy_options("proxy.clinic.local")
