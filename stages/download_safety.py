"""URL and address checks of the ``download`` stage's fetcher (the SSRF guard).

Only http and https URLs; ``FetchPolicy.deny_hosts`` and then ``allow_hosts`` (fnmatch
patterns) are checked, and every host is resolved with ``socket.getaddrinfo``: an address that
is loopback, private, link-local, reserved, multicast, unspecified or otherwise not globally
routable is refused (``private_address``) unless ``allow_private`` names the host, the address
or a network containing it (``check_url``). The fetcher follows redirects by hand and checks
every hop again.

As a guard against DNS rebinding the peer address of the actual connection (plain or TLS) is
checked too (``check_peer``), as soon as the response headers are in and before any body byte
is read, redirect bodies included (not when a proxy from the environment is used: the peer is
then the proxy). The check fails closed: when the peer address cannot be read the response is
dropped unread (``unverified_peer``) unless ``allow_private`` names the host.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import requests

from speechmill.stages.download_policy import FetchError, FetchPolicy, IPAddress, IPNetwork

__all__ = ["bad_url", "check_peer", "check_url"]


def bad_url(url: str, detail: str) -> FetchError:
    """A final ``bad_url`` failure of ``url``."""
    return FetchError("bad_url", detail, url=url)


def _split_url(url: str) -> tuple[str, int]:
    """(host, port) of an http(s) URL, or ``bad_url``."""
    if not isinstance(url, str) or not url:
        raise bad_url(str(url), "empty URL")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise bad_url(url, "control character in URL")
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as e:
        raise bad_url(url, f"malformed URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise bad_url(url, f"unsupported scheme {scheme or '(none)'!r}; http and https only")
    if not host:
        raise bad_url(url, "URL has no host")
    if port == 0:
        raise bad_url(url, "port 0")
    return host.rstrip(".").lower() or host, port or (443 if scheme == "https" else 80)


def _matches(host: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(host, p.strip().lower()) for p in patterns)


def _check_lists(url: str, host: str, policy: FetchPolicy) -> None:
    if policy.deny_hosts and _matches(host, policy.deny_hosts):
        raise FetchError("blocked_host", f"host {host} is on the deny list", url=url)
    if policy.allow_hosts and not _matches(host, policy.allow_hosts):
        raise FetchError("blocked_host", f"host {host} is not on the allow list", url=url)


def _private_kind(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address, or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            return _private_kind(embedded)
    for kind in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:
        return "not globally routable"
    return None


@functools.lru_cache(maxsize=64)
def _exemptions(entries: tuple[str, ...]) -> tuple[tuple[IPNetwork, ...], tuple[str, ...]]:
    nets: list[IPNetwork] = []
    names: list[str] = []
    for e in entries:
        e = e.strip().lower()
        try:
            nets.append(ipaddress.ip_network(e.strip("[]"), strict=False))
        except ValueError:
            names.append(e.rstrip("."))
    return tuple(nets), tuple(names)


def _exempt(host: str, ip: IPAddress, policy: FetchPolicy) -> bool:
    nets, names = _exemptions(policy.allow_private)
    if any(fnmatch.fnmatchcase(host, n) for n in names):
        return True
    cands: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        cands.append(ip.ipv4_mapped)
    return any(c.version == n.version and c in n for c in cands for n in nets)


def _parse_ip(addr: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return None


def _check_address(url: str, host: str, port: int, policy: FetchPolicy) -> None:
    """Resolve ``host``; refuse it if any address is non-public and not exempt."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError as e:
        raise bad_url(url, f"bad host name {host!r}: {e}") from None
    except socket.gaierror as e:
        # a temporary resolver failure is worth a retry; "no such name" is not
        temporary = e.errno in (socket.EAI_AGAIN,)
        raise FetchError("connection_error", f"cannot resolve {host}: {e.strerror or e}",
                         url=url, retry=temporary) from None
    except OSError as e:
        raise FetchError("connection_error", f"cannot resolve {host}: {e}", url=url) from None
    for info in infos:
        ip = _parse_ip(str(info[4][0]))
        if ip is None:
            continue
        kind = _private_kind(ip)
        if kind and not _exempt(host, ip, policy):
            raise FetchError("private_address",
                             f"{host} resolves to {ip} ({kind}); not in allow_private", url=url)


def check_url(url: str, policy: FetchPolicy, *, resolve: bool = True) -> str:
    """Refuse what ``policy`` would refuse before sending anything; returns the host.

    Raises ``FetchError`` with ``bad_url``, ``blocked_host`` or (when ``resolve``)
    ``private_address`` / ``connection_error`` (the name does not resolve).
    """
    host, port = _split_url(url)
    _check_lists(url, host, policy)
    if resolve:
        _check_address(url, host, port, policy)
    return host


def _proxied(url: str) -> bool:
    try:
        proxies = requests.utils.get_environ_proxies(url, no_proxy=None)
        return bool(requests.utils.select_proxy(url, proxies))
    except Exception:
        return True  # unknown: do not second-guess the connection


def _host_exempt(host: str, policy: FetchPolicy) -> bool:
    """``allow_private`` names ``host`` (a name pattern, or an address it covers)."""
    _, names = _exemptions(policy.allow_private)
    if any(fnmatch.fnmatchcase(host, n) for n in names):
        return True
    ip = _parse_ip(host.strip("[]"))
    return ip is not None and _exempt(host, ip, policy)


def _response_sockets(resp: requests.Response) -> Iterator[Any]:
    """The sockets a response may be read from (urllib3 2.x first, then the
    http.client reader underneath), without raising."""
    raw = resp.raw
    for path in (("connection", "sock"), ("_connection", "sock"),
                 ("_fp", "fp", "raw", "_sock")):
        obj: Any = raw
        for attr in path:
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None:
            yield obj
            inner = getattr(obj, "socket", None)  # urllib3's SSLTransport (TLS in TLS)
            if inner is not None:
                yield inner


def _peer_ip(resp: requests.Response) -> IPAddress | None:
    """The address the response's connection is connected to (plain or TLS: an
    ``ssl.SSLSocket`` answers ``getpeername`` too), or None when it cannot be read."""
    for sock in _response_sockets(resp):
        try:
            ip = _parse_ip(str(sock.getpeername()[0]))
        except Exception:  # noqa: BLE001 - closed, not a socket: try the next one
            continue
        if ip is not None:
            return ip
    return None


def check_peer(resp: requests.Response, host: str, url: str, policy: FetchPolicy) -> None:
    """Second SSRF layer (DNS rebinding): the connected address must be public or
    exempt. Fails closed: an unreadable peer address is ``unverified_peer`` unless
    ``allow_private`` names the host."""
    ip = _peer_ip(resp)
    kind = _private_kind(ip) if ip is not None else None
    if ip is not None and kind is None:
        return
    if _proxied(url):
        return  # the peer is the proxy, not the host
    if ip is None:
        if _host_exempt(host, policy):
            return
        raise FetchError("unverified_peer", f"cannot read the address {host} is "
                         "connected to; response dropped unread (list the host in "
                         "allow_private to skip this check)", status=resp.status_code,
                         url=url)
    if not _exempt(host, ip, policy):
        raise FetchError("private_address", f"{host} connected to {ip} ({kind}); "
                         "not in allow_private", status=resp.status_code, url=url)
