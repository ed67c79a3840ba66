"""``dr-screen serve``: the review page on waitress (a pure-Python production WSGI server from the package
index: threads, request size limits and no debug console, unlike Flask's development server)."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from screening.config import ScreeningSettings
from screening.db import reviews as rrepo
from screening.db.session import session_scope
from screening.web.app import create_app, is_loopback

log = logging.getLogger("screening.web")


class ServeError(RuntimeError):
    """The page cannot start as asked; the message says what to do."""


def serve(
    settings: ScreeningSettings,
    factory: sessionmaker[Session],
    templates_dir: Path,
    *,
    host: str,
    port: int,
    require_login: bool = False,
    secure_cookies: bool = False,
    trusted_proxy: str | None = None,
    threads: int = 4,
) -> None:
    """Serve until interrupted. Off loopback a login is always required, and at least one user must exist.

    ``trusted_proxy``: the address of the HTTPS proxy in front of the page. Its ``X-Forwarded-For`` and
    ``X-Forwarded-Proto`` headers are then believed (from it only), so that the login brake counts each client's
    own address; without it every client behind the proxy shares the proxy's address."""
    loopback = is_loopback(host)
    proxy = proxy_options(trusted_proxy)  # checked first: a bad address stops the start
    # behind a proxy the page serves the network even when bound to 127.0.0.1 (the proxy's Host passes the loopback
    # check), so a login is required whenever a proxy is named
    require_login = require_login or not loopback or bool(proxy)
    if require_login:
        with session_scope(factory) as s:
            if rrepo.count_active_users(s) == 0:
                raise ServeError("the review page needs a login here (bound to %s), but there is no active user: add one "
                                 "with `dr-screen user add NAME --name \"Display name\"`" % host)
    if not loopback and not secure_cookies:
        log.warning("serving on %s without TLS: passwords and patient data cross the network in clear text; put the page "
                    "behind an HTTPS proxy and pass --secure-cookies", host)
    app = create_app(settings, factory, templates_dir, require_login=require_login, loopback=loopback,
                     secure_cookies=secure_cookies)
    from waitress import serve as waitress_serve

    log.info("review page on http://%s:%d/ (%s)", host if ":" not in host else f"[{host}]", port,
             "login required" if require_login else "local access, no login")
    waitress_serve(app, host=host, port=port, threads=threads, ident="dr-screen", clear_untrusted_proxy_headers=True,
                   max_request_body_size=1024 * 1024, **proxy)


def proxy_options(trusted_proxy: str | None) -> dict[str, object]:
    """waitress's settings for one trusted proxy (none: proxy headers are dropped, the peer is the client)."""
    if not trusted_proxy:
        return {}
    import ipaddress

    try:
        ipaddress.ip_address(trusted_proxy)
    except ValueError:
        raise ServeError(f"--trusted-proxy {trusted_proxy!r} is not an IP address: give the proxy's address as the page "
                         "sees it (for a proxy on this machine, 127.0.0.1)") from None
    return {"trusted_proxy": trusted_proxy, "trusted_proxy_count": 1,
            "trusted_proxy_headers": {"x-forwarded-for", "x-forwarded-proto"}}


__all__ = ["ServeError", "proxy_options", "serve"]
