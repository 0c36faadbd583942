"""How results reach a destination, as data: one line per protocol.

A destination names its protocol (a C-STORE destination ``dimse``; a web destination
``stow-rs`` unless its ``protocol`` key says otherwise), and the protocol says which media
types it carries. A result whose media type a destination's protocol does not carry is not
put in that destination's outbox. A new protocol (FHIR, say) is one transport module and
one :func:`register` call. :func:`check_outputs` refuses at start a configuration whose
destinations and output kinds do not fit together.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass

from dp_model.config import ConfigError
from pacs_node.config import Destination, NodeConfig, OutboxConfig, WebDestination
from pacs_node.delivery.cstore import CStoreTransport
from pacs_node.delivery.fhir import open_fhir
from pacs_node.delivery.stow import StowTransport
from pacs_node.delivery.transport import Transport
from pacs_node.results.base import DICOM, FHIR_JSON, ResultWriter
from pacs_node.results.registry import writers_for

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


def check_outputs(config: NodeConfig) -> list[ResultWriter]:
    """The writers of ``outputs``; a ConfigError naming the key when an output kind, a
    destination's protocol, or a kind a destination lists is not one the node has, when a
    destination could never take anything the node writes, or when a kind would be written for
    every image and taken by no destination (with destinations, ``output_dir`` is not used)."""
    writers = writers_for(config.outputs)
    taken: set[str] = set()
    destinations = config.parsed_destinations()
    for index, destination in enumerate(destinations):
        protocol = protocol_of(destination)
        listed = (
            writers_for(destination.outputs, f"destinations[{index}].outputs")
            if destination.outputs
            else writers
        )
        missing = [w.kind for w in listed if w.kind not in config.outputs]
        if missing:
            raise ConfigError(
                f"destinations[{index}].outputs lists {', '.join(missing)}, which outputs does not write ({', '.join(config.outputs)})"
            )
        media = {w.kind: w.media_type for w in listed}
        if not any(m in protocol.media_types for m in media.values()):
            raise ConfigError(
                f"destinations[{index}] ({protocol.name}) carries none of the outputs it would take: {', '.join(media)}"
            )
        taken |= {kind for kind, m in media.items() if m in protocol.media_types}
    untaken = [w.kind for w in writers if destinations and w.kind not in taken]
    if untaken:
        raise ConfigError(
            f"outputs writes {', '.join(untaken)}, which no destination takes: add a destination that carries it, or remove it from outputs"
        )
    return writers
