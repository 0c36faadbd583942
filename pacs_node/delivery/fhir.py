"""The worklist message to a FHIR server: each transaction Bundle POSTed to the service base
(FHIR R4 RESTful API, batch/transaction), asked about by search when in doubt.

One request per message: a transaction stands or falls whole, and one message the server
refuses must not take the others with it. The answer decides:

* 2xx: the server committed the transaction: delivered;
* 401, 403: the credentials were refused: the destination is held, as for STOW-RS;
* 404, 408, 429, 3xx, 5xx: the server cannot take it now (404 to a POST at the base: the URL
  names no FHIR service, a fault of the destination, not of the message), tried again with
  backoff, for at least its Retry-After;
* any other 4xx (400, 409, 412, 422 ...): the server will never take this message: a dead
  letter at once (reason ``refused``), with its audit line;
* no answer (a timeout, a connection broken after the body left): in doubt. Before it is sent
  again the node searches ``DiagnosticReport?identifier=<system>|<value>``; a server that
  cannot say gets it again, and its conditional create (``ifNoneExist``) stores nothing twice.

Connections, TLS, authentication and the fixed phrases are those of
:mod:`pacs_node.delivery.stow`: nothing the server sends reaches a log line or the audit trail.
"""

from __future__ import annotations

import http.client
import json
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from dp_model.config import ConfigError
from pacs_node.config import Destination, OutboxConfig, WebDestination
from pacs_node.delivery.stow import AUTHENTICATION, StowLink, StowTransport, _phrase, _seconds, _why
from pacs_node.delivery.transport import STORED, Outcome, Status
from pacs_node.results.base import FHIR_JSON

logger = logging.getLogger(__name__)

#: Client errors that say the server cannot take the message now, not that it never will.
LATER = frozenset({404, 408, 429})


class FhirTransport(StowTransport):
    """HTTP connections to one FHIR server (those of a DICOMweb service), whose links speak FHIR."""

    def _link(
        self, connection: http.client.HTTPConnection, authorization: dict[str, str]
    ) -> FhirLink:
        return FhirLink(self.destination, connection, authorization, self.max_request_bytes)


class FhirLink(StowLink):
    """One HTTP connection to a FHIR server for one batch, a request per message."""

    def groups(self, files: list[Path]) -> list[list[Path]]:
        return [[path] for path in files]

    def send(self, group: list[Path], on_wire: Callable[[list[Path]], None]) -> dict[Path, Outcome]:
        return {path: self._transaction(path, on_wire) for path in group}

    def has(self, path: Path) -> bool:
        """Whether the server stores the message's DiagnosticReport (a search by its identifier);
        False when it cannot say, and the message goes again."""
        try:
            system, value = report_identifier(path.read_bytes())
            token = quote(f"{system}|{value}", safe="")
            target = f"{self.destination.base_path}/DiagnosticReport?identifier={token}"
            if self._reconnect():
                return False
            status, body, _ = self._exchange("GET", target, {"Accept": FHIR_JSON})
        except (OSError, ValueError, http.client.HTTPException) as exc:
            self.connection.close()
            logger.info(
                "%s: could not ask whether %s arrived (%s); sending it again",
                self.destination,
                path.stem,
                _why(exc),
            )
            return False
        return status == 200 and _lists(body, system, value)

    def _transaction(self, path: Path, on_wire: Callable[[list[Path]], None]) -> Outcome:
        """POST one message to the service base; its outcome."""
        try:
            data = path.read_bytes()
            report_identifier(data)
        except (OSError, ValueError) as exc:
            return Outcome(
                Status.REJECTED, "unreadable", f"unreadable outbox file ({type(exc).__name__})"
            )
        problem = self._reconnect()
        if problem:
            return Outcome(Status.UNAVAILABLE, detail=problem)
        headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON, "Content-Length": str(len(data))}
        on_wire([path])
        try:
            status, _, retry_after = self._exchange(
                "POST", f"{self.destination.base_path}/", headers, [data]
            )
        except (OSError, http.client.HTTPException) as exc:
            self.connection.close()
            self.usable = False
            return Outcome(
                Status.UNANSWERED, detail=f"no answer to the FHIR transaction ({_why(exc)})"
            )
        outcome = fate(status, _seconds(retry_after))
        self.usable = outcome.status is not Status.UNAVAILABLE
        return outcome


def fate(status: int, retry_after: float = 0.0) -> Outcome:
    """What the HTTP status of the answer to a transaction says of its message."""
    if 200 <= status < 300:
        return STORED
    if status in AUTHENTICATION:
        return Outcome(
            Status.UNAVAILABLE,
            "authentication",
            f"HTTP {status}: the destination refused the credentials",
        )
    if 400 <= status < 500 and status not in LATER:
        return Outcome(Status.REJECTED, "refused", f"HTTP {status} {_phrase(status)}")
    return Outcome(
        Status.UNAVAILABLE, detail=f"HTTP {status} {_phrase(status)}", retry_after=retry_after
    )


def report_identifier(data: bytes) -> tuple[str, str]:
    """The system and value of the identifier of a message's DiagnosticReport; ValueError when
    ``data`` is not a Bundle with one DiagnosticReport that has one."""
    try:
        bundle = json.loads(data)
        (report,) = [
            entry["resource"]
            for entry in bundle["entry"]
            if entry["resource"]["resourceType"] == "DiagnosticReport"
        ]
        identifier = report["identifier"][0]
        return str(identifier["system"]), str(identifier["value"])
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(
            "not a worklist message (a Bundle with one identified DiagnosticReport)"
        ) from exc


def _lists(body: bytes, system: str, value: str) -> bool:
    """Whether a searchset Bundle holds a DiagnosticReport with this very identifier (not
    whatever a lax server returns)."""
    try:
        found = json.loads(body)
        return any(
            entry["resource"]["resourceType"] == "DiagnosticReport"
            and {"system": system, "value": value}
            in [
                {"system": i.get("system"), "value": i.get("value")}
                for i in entry["resource"]["identifier"]
            ]
            for entry in found.get("entry") or []
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def open_fhir(
    destination: Destination | WebDestination,
    ae: str,
    config: OutboxConfig,
    tls: ssl.SSLContext | None,
    timeout: float,
) -> FhirTransport:
    """The ``fhir`` protocol's transport (:mod:`pacs_node.delivery.registry`)."""
    if not isinstance(destination, WebDestination):
        raise ConfigError(
            f"protocol of {destination}: fhir sends to a FHIR server's URL, not to an AE title"
        )
    return FhirTransport(destination, tls, timeout, config.max_request_mb * 2**20)
