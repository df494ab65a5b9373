"""Where a webhook may be sent: the URL's form at registration, and at delivery time the
addresses its host resolves to (server-side request forgery: a tenant's URL must not reach the
deployment's own network, its cloud metadata service or loopback)."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable
from urllib.parse import urlsplit

from ..errors import ValidationFailed

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_URL_CHARS = 2048
_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9_-]{0,62}[a-z0-9])?(\.[a-z0-9]([a-z0-9_-]{0,62}[a-z0-9])?)*\.?")
_LOOPBACK_NAMES = ("localhost", "localhost.", "localhost.localdomain")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class TargetRefused(Exception):
    """The target's address is one the policy keeps webhooks away from; nothing was sent."""


@dataclass(frozen=True)
class TargetPolicy:
    """Addresses a webhook may reach: public ones, and those of `allowed` networks (the local stack
    allows loopback; RTQCC_WEBHOOK_ALLOW_PRIVATE widens it)."""

    allowed: tuple[str, ...] = ()

    @cached_property
    def _networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(net, strict=False) for net in self.allowed]

    def check(self, address: IpAddress) -> None:
        """Raise TargetRefused unless `address` (and every address it embeds) may be reached."""
        for candidate in _with_embedded(address):
            if any(net.version == candidate.version and candidate in net for net in self._networks):
                continue
            if candidate.is_multicast or not candidate.is_global:
                raise TargetRefused(f"{address} is a {_kind(candidate)} address, which webhooks may not reach "
                                    "(RTQCC_WEBHOOK_ALLOW_PRIVATE allows it)")


def _with_embedded(address: IpAddress) -> list[IpAddress]:
    """The address and the IPv4 ones an IPv6 address carries (mapped, 6to4, Teredo, NAT64): each
    reaches the IPv4 host it names, so each is checked."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return [address.ipv4_mapped]  # the IPv4 host itself, reached over an IPv6 socket
    found: list[IpAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.sixtofour:
            found.append(address.sixtofour)
        if address.teredo:
            found.extend(address.teredo)
        if address in _NAT64:
            found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def _kind(address: IpAddress) -> str:
    for name in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
        if getattr(address, f"is_{name}"):
            return name.replace("_", "-")
    return "non-public"


@dataclass(frozen=True)
class Target:
    """A URL taken apart: its scheme, host as written (for Host and TLS), port, and the path with query."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def url_at(self, address: IpAddress) -> str:
        """The URL with the host replaced by `address`, the one that was checked."""
        host = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    def literal_address(self) -> IpAddress | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None


def parse_target(url: str) -> Target:
    """A webhook URL's parts, or ValidationFailed saying what is wrong with it: http or https, a
    host name or IP address, no credentials (they would be stored and shown), no fragment."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise ValidationFailed(f"url must be an http or https URL of at most {MAX_URL_CHARS} characters.")
    if any(ord(c) < 33 or ord(c) == 127 for c in url) or not url.isascii():
        raise ValidationFailed("url must not contain spaces, control or non-ASCII characters (percent-encode them).")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValidationFailed(f"url is not a valid URL: {exc}.") from None
    if parts.scheme not in ("http", "https"):
        raise ValidationFailed(f"url must start with https:// or http://, not {parts.scheme + '://' if parts.scheme else url[:20]!r}.")
    if parts.username is not None or parts.password is not None:
        raise ValidationFailed("url must not carry credentials (user:password@); the signature proves who sends.")
    if parts.fragment or url.endswith("#"):
        raise ValidationFailed("url must not have a #fragment: it is never sent.")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValidationFailed("url must name a host, like https://hooks.example.com/rtqcc.")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.fullmatch(host) or len(host) > 253:
            raise ValidationFailed(f"url's host {host[:80]!r} is not a valid host name or IP address.") from None
    path = parts.path or "/"
    return Target(scheme=parts.scheme, host=host, port=port or (443 if parts.scheme == "https" else 80),
                  path=path + (f"?{parts.query}" if parts.query else ""))


def check_registration(url: str, policy: TargetPolicy) -> str:
    """At registration: the URL's form, and what can be known without resolving it (an address
    written in it, a loopback name). The full check is at delivery time, when the name resolves."""
    target = parse_target(url)
    address = target.literal_address()
    if address is None and (target.host in _LOOPBACK_NAMES or target.host.endswith(".localhost")):
        address = ipaddress.ip_address("127.0.0.1")
    if address is not None:
        try:
            policy.check(address)
        except TargetRefused as exc:
            raise ValidationFailed(f"url's host is refused: {exc}.") from None
    return url


Resolver = Callable[[str, int], Iterable[str]]


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (an IP literal resolves to itself, without a lookup)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def checked_addresses(target: Target, policy: TargetPolicy, resolver: Resolver = resolve) -> list[IpAddress]:
    """At delivery time: every address the host resolves to, each allowed by `policy`, else
    TargetRefused for the whole target (a name that mixes public and private addresses is refused:
    which one a connection would reach is the resolver's choice). The sender connects to these
    very addresses, so a second lookup (DNS rebinding) cannot switch them."""
    literal = target.literal_address()
    if literal is not None:
        addresses = [literal]
    else:
        try:
            addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolver(target.host, target.port)]
        except OSError as exc:
            raise TargetRefused(f"the host {target.host} does not resolve: {exc}") from None
    if not addresses:
        raise TargetRefused(f"the host {target.host} resolves to no address")
    for address in addresses:
        policy.check(address)
    return addresses
