"""How results reach a destination, as data: one line per protocol.

A destination names its protocol (a C-STORE destination ``dimse``; a web destination
``stow-rs`` unless its ``protocol`` key says otherwise), and the protocol says which media
types it carries. A result whose media type a destination's protocol does not carry is not
put in that destination's outbox. A new protocol (FHIR, say) is one transport module and
one :func:`register` call.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass

from dp_model.config import ConfigError
from pacs_node.config import Destination, OutboxConfig, WebDestination
from pacs_node.delivery.cstore import CStoreTransport
from pacs_node.delivery.fhir import open_fhir
from pacs_node.delivery.stow import StowTransport
from pacs_node.delivery.transport import Transport
from pacs_node.results.base import DICOM, FHIR_JSON

Opener = Callable[
    [Destination | WebDestination, str, OutboxConfig, ssl.SSLContext | None, float], Transport
]


@dataclass(frozen=True, kw_only=True)
class Protocol:
    """A way to deliver results.

    Attributes:
        name: what a destination's ``protocol`` says.
        media_types: the media types of results it carries.
        open: builds the destination's transport from the destination, the node's calling AE
            title, the outbox settings, the TLS context (or None) and the network timeout.
    """

    name: str
    media_types: frozenset[str]
    open: Opener


PROTOCOLS: dict[str, Protocol] = {}


def register(protocol: Protocol) -> Protocol:
    if protocol.name in PROTOCOLS:
        raise ValueError(f"protocol {protocol.name!r} is already registered")
    PROTOCOLS[protocol.name] = protocol
    return protocol


def unregister(name: str) -> None:
    """Remove a protocol added by :func:`register` (a test cleans up after itself)."""
    PROTOCOLS.pop(name, None)


def protocol_of(destination: Destination | WebDestination) -> Protocol:
    """The destination's protocol; a ConfigError naming it when none of that name is known."""
    found = PROTOCOLS.get(destination.protocol)
    if found is None:
        raise ConfigError(
            f"protocol of {destination} must be one of {', '.join(PROTOCOLS)}, got {destination.protocol!r}"
        )
    return found


def _open_dimse(
    destination: Destination | WebDestination,
    ae: str,
    config: OutboxConfig,
    tls: ssl.SSLContext | None,
    timeout: float,
) -> Transport:
    if not isinstance(destination, Destination):
        raise ConfigError(
            f"protocol of {destination}: dimse sends to an AE title at a host and port, not to a web address"
        )
    return CStoreTransport(destination, ae, tls, timeout)


def _open_stow(
    destination: Destination | WebDestination,
    ae: str,
    config: OutboxConfig,
    tls: ssl.SSLContext | None,
    timeout: float,
) -> Transport:
    if not isinstance(destination, WebDestination):
        raise ConfigError(
            f"protocol of {destination}: stow-rs sends to a web address, not to an AE title"
        )
    return StowTransport(destination, tls, timeout, config.max_request_mb * 2**20)


register(Protocol(name="dimse", media_types=frozenset({DICOM}), open=_open_dimse))
register(Protocol(name="stow-rs", media_types=frozenset({DICOM}), open=_open_stow))
register(Protocol(name="fhir", media_types=frozenset({FHIR_JSON}), open=open_fhir))
