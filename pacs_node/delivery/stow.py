"""Results to a DICOMweb service: STOW-RS (PS3.18 10.5) per batch, QIDO-RS (PS3.18 10.6) about objects in doubt.

A batch goes in as few ``multipart/related; type="application/dicom"`` POSTs to
``<url>/studies`` as ``outbox.max_request_mb`` allows, each part an outbox file as it is
(PS3.10, in its own transfer syntax: a JPEG-LS overlay stays JPEG-LS lossless). The answer decides
the fate of each object (PS3.18 10.5.3):

* an instance listed in FailedSOPSequence is refused, with its FailureReason; one listed in
  ReferencedSOPSequence is stored (with a WarningReason or not), whatever the HTTP status
  (a server may store part of a request it answers 400);
* otherwise 200 means stored; another 2xx leaves the object in doubt; 400, 409, 413, 415 and
  422 refuse it (a request of several refused without saying which is sent again one object
  per request); 401 and 403 hold the destination (``authentication``); anything else (3xx,
  404, 408, 429, 5xx) leaves it unavailable for now, for at least its Retry-After;
* a connection that breaks once the body has left leaves the objects in doubt: before they
  are sent again, QIDO-RS asks whether the service has them.

Nothing the service sends reaches a log line or the audit trail, only status codes and fixed
sentences. The password or token is read when a link opens, and goes only into the
Authorization header.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import logging
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.etree import ElementTree

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from pacs_node.config import WebDestination
from pacs_node.delivery.transport import STORED, Outcome, Status, Unreachable

logger = logging.getLogger(__name__)

#: Statuses that refuse the instances of a request: malformed, conflicting, too large, of a
#: media type or transfer syntax the service does not take, unprocessable.
REFUSING = frozenset({400, 409, 413, 415, 422})
#: Statuses that refuse the node's credentials.
AUTHENTICATION = frozenset({401, 403})
#: Most bytes of an answer read: a STOW-RS or QIDO-RS answer about a batch is small.
MAX_ANSWER_BYTES = 4 * 2**20
DICOM_JSON = "application/dicom+json"
#: What a STOW-RS answer may be: DICOM JSON, preferred, or XML (PS3.18 10.5.2).
STORE_ANSWER_TYPES = "application/dicom+json, application/dicom+xml;q=0.9"
#: Tags of the Store Instances Response Module (PS3.18 Table 10.5.3-3) and of SOP Instance UID.
REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE = "00081199", "00081198"
REFERENCED_SOP_INSTANCE_UID, WARNING_REASON, FAILURE_REASON = "00081155", "00081196", "00081197"
SOP_INSTANCE_UID = "00080018"
#: Errors that mean an outbox file is not a DICOM file the node can send.
UNREADABLE = (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError)


@dataclass(frozen=True)
class Answer:
    """A STOW-RS answer: its HTTP status, and the instances it lists as stored and as failed, with their codes."""

    status: int
    stored: dict[str, int | None]
    failed: dict[str, int | None]
    retry_after: float = 0.0


class StowTransport:
    """HTTP connections to one DICOMweb service.

    Args:
        destination: the service.
        tls: the client TLS context for https (trust and client certificate); None: the system store.
        timeout_s: connection and socket timeout.
        max_request_bytes: most bytes of DICOM files in one request.
    """

    def __init__(
        self,
        destination: WebDestination,
        tls: ssl.SSLContext | None,
        timeout_s: float,
        max_request_bytes: int,
    ) -> None:
        self.destination, self.timeout_s, self.max_request_bytes = (
            destination,
            timeout_s,
            max_request_bytes,
        )
        self.tls = (tls or ssl.create_default_context()) if destination.https else None

    def open(self, ask: bool) -> StowLink:
        try:
            authorization = _authorization(self.destination)
        except ValueError as exc:  # the secret file went away, the variable was unset
            raise Unreachable(f"the credentials cannot be read ({exc})", "authentication") from None
        connection = self._connection()
        try:
            connection.connect()
        except OSError as exc:
            connection.close()
            raise Unreachable(f"no connection ({_why(exc)})") from None
        return self._link(connection, authorization)

    def _link(
        self, connection: http.client.HTTPConnection, authorization: dict[str, str]
    ) -> StowLink:
        """What an open connection becomes (another protocol over HTTP makes its own link)."""
        return StowLink(self.destination, connection, authorization, self.max_request_bytes)

    def _connection(self) -> http.client.HTTPConnection:
        host, port = self.destination.host, self.destination.port
        if self.tls is not None:
            return http.client.HTTPSConnection(host, port, timeout=self.timeout_s, context=self.tls)
        return http.client.HTTPConnection(host, port, timeout=self.timeout_s)


class StowLink:
    """One HTTP connection (opened again when the service closes it) for one batch."""

    def __init__(
        self,
        destination: WebDestination,
        connection: http.client.HTTPConnection,
        authorization: dict[str, str],
        max_request_bytes: int,
    ) -> None:
        self.destination, self.connection, self.max_request_bytes = (
            destination,
            connection,
            max_request_bytes,
        )
        self.authorization = authorization
        self.usable = True

    def groups(self, files: list[Path]) -> list[list[Path]]:
        """Runs of files whose sizes together fit the size cap; a larger file goes alone."""
        groups: list[list[Path]] = []
        size = 0
        for path in files:
            length = _size(path)
            if groups and size + length <= self.max_request_bytes:
                groups[-1].append(path)
                size += length
            else:
                groups.append([path])
                size = length
        return groups

    def send(self, group: list[Path], on_wire: Callable[[list[Path]], None]) -> dict[Path, Outcome]:
        outcomes: dict[Path, Outcome] = {}
        parts: dict[Path, tuple[str, bytes]] = {}
        for path in group:
            try:
                parts[path] = _instance(path)
            except UNREADABLE as exc:
                outcomes[path] = Outcome(
                    Status.REJECTED, "unreadable", f"unreadable outbox file ({type(exc).__name__})"
                )
        return outcomes | (self._post(parts, on_wire) if parts else {})

    def has(self, path: Path) -> bool:
        """Whether the service already stores an object in doubt (QIDO-RS for the instance, by its
        study, series and SOP Instance UID); False when it cannot say, and the object goes again."""
        try:
            header = dcmread(path, stop_before_pixels=True)
            study, series, uid = (
                str(header[keyword].value)
                for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
            )
            target = f"{self.destination.base_path}/studies/{quote(study)}/series/{quote(series)}/instances?SOPInstanceUID={quote(uid)}"
            status, body, _ = self._exchange("GET", target, {"Accept": DICOM_JSON})
        except (*UNREADABLE, http.client.HTTPException) as exc:
            self.connection.close()
            logger.info(
                "%s: could not ask whether %s arrived (%s); sending it again",
                self.destination,
                path.stem,
                _why(exc),
            )
            return False
        # this very instance, not whatever a lax service returns
        return status == 200 and uid in _found(body)

    def close(self) -> None:
        self.connection.close()

    def _post(
        self, parts: dict[Path, tuple[str, bytes]], on_wire: Callable[[list[Path]], None]
    ) -> dict[Path, Outcome]:
        """One STOW-RS request for ``parts``; the outcome of each."""
        problem = self._reconnect()
        if problem:
            return dict.fromkeys(parts, Outcome(Status.UNAVAILABLE, detail=problem))
        boundary = uuid.uuid4().hex
        body = _multipart([data for _, data in parts.values()], boundary)
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": STORE_ANSWER_TYPES,
            "Content-Length": str(sum(map(len, body))),
        }
        on_wire(list(parts))
        try:
            answer = _answer(*self._exchange("POST", self.destination.stow_path, headers, body))
        except (OSError, http.client.HTTPException) as exc:
            self.connection.close()
            self.usable = False
            return dict.fromkeys(
                parts, Outcome(Status.UNANSWERED, detail=f"no answer to STOW-RS ({_why(exc)})")
            )
        if len(parts) > 1 and answer.status in REFUSING and not (answer.stored or answer.failed):
            logger.info(
                "%s: a request of %d refused (HTTP %d) without saying which; sending them one by one",
                self.destination,
                len(parts),
                answer.status,
            )
            return {
                path: outcome
                for path, part in parts.items()
                for path, outcome in self._post({path: part}, on_wire).items()
            }
        outcomes = {path: fate(answer, uid) for path, (uid, _) in parts.items()}
        self._note_warnings(answer)
        self.usable = all(
            o.status not in (Status.UNAVAILABLE, Status.UNANSWERED) for o in outcomes.values()
        )
        return outcomes

    def _reconnect(self) -> str:
        """Open another connection when the service closed the last one, before anything leaves;
        why it could not be opened (the link is then unusable), or empty."""
        if self.connection.sock is not None:
            return ""
        try:
            self.connection.connect()
        except OSError as exc:
            self.connection.close()
            self.usable = False
            return f"no connection ({_why(exc)})"
        return ""

    def _exchange(
        self, method: str, target: str, headers: dict[str, str], body: list[bytes] | None = None
    ) -> tuple[int, bytes, str | None]:
        """One request and its answer: status, at most MAX_ANSWER_BYTES of the body, Retry-After."""
        self.connection.request(method, target, body=body, headers=headers | self.authorization)
        response = self.connection.getresponse()
        content = response.read(MAX_ANSWER_BYTES)
        if not response.isclosed():  # longer than any answer worth reading: this connection is done
            self.connection.close()
        return response.status, content, response.getheader("Retry-After")

    def _note_warnings(self, answer: Answer) -> None:
        for uid, code in answer.stored.items():
            if code:
                logger.info("%s: %s stored with warning 0x%04X", self.destination, uid, code)


def fate(answer: Answer, uid: str) -> Outcome:
    """What the answer to a STOW-RS request says of one of its instances (PS3.18 10.5.3)."""
    status = answer.status
    if status in AUTHENTICATION:
        return Outcome(
            Status.UNAVAILABLE,
            "authentication",
            f"HTTP {status}: the destination refused the credentials",
        )
    if uid in answer.failed:
        code = answer.failed[uid]
        return Outcome(
            Status.REFUSED,
            "refused",
            f"STOW-RS failure reason {'unstated' if code is None else f'0x{code:04X}'} (HTTP {status})",
        )
    if uid in answer.stored or status == 200:
        return STORED
    if 200 <= status < 300:
        return Outcome(
            Status.UNANSWERED, detail=f"HTTP {status} without this instance in the answer"
        )
    if status in REFUSING:
        return Outcome(Status.REFUSED, "refused", f"HTTP {status} {_phrase(status)}")
    return Outcome(
        Status.UNAVAILABLE,
        detail=f"HTTP {status} {_phrase(status)}",
        retry_after=answer.retry_after,
    )


def read_store_answer(body: bytes) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """The instances a STOW-RS answer lists as stored (with their WarningReason) and as failed
    (with their FailureReason), from DICOM JSON (PS3.18 F.2) or XML (PS3.19 A.1); nothing
    from anything else."""
    text = body.lstrip()
    try:
        if text.startswith(b"{"):
            found = json.loads(text)
            return _json_listed(found, REFERENCED_SOP_SEQUENCE, WARNING_REASON), _json_listed(
                found, FAILED_SOP_SEQUENCE, FAILURE_REASON
            )
        if text.startswith(b"<") and b"<!DOCTYPE" not in text and b"<!ENTITY" not in text:
            # no entities from a peer
            root = ElementTree.fromstring(text)
            return _xml_listed(root, REFERENCED_SOP_SEQUENCE, WARNING_REASON), _xml_listed(
                root, FAILED_SOP_SEQUENCE, FAILURE_REASON
            )
    except (ValueError, TypeError, AttributeError, ElementTree.ParseError):
        pass
    return {}, {}


def _answer(status: int, body: bytes, retry_after: str | None) -> Answer:
    stored, failed = read_store_answer(body)
    return Answer(status, stored, failed, _seconds(retry_after))


def _json_listed(answer: dict[str, Any], sequence: str, code: str) -> dict[str, int | None]:
    listed: dict[str, int | None] = {}
    for item in answer.get(sequence, {}).get("Value") or []:
        uid = _json_first(item, REFERENCED_SOP_INSTANCE_UID)
        if uid:
            listed[str(uid)] = _number(_json_first(item, code))
    return listed


def _json_first(item: dict[str, Any], tag: str) -> Any:
    """The first value of an attribute of a DICOM JSON object (PS3.18 F.2): whatever the peer sent."""
    return (item.get(tag, {}).get("Value") or [None])[0]


def _xml_listed(root: ElementTree.Element, sequence: str, code: str) -> dict[str, int | None]:
    listed: dict[str, int | None] = {}
    for item in root.iterfind(f"{{*}}DicomAttribute[@tag='{sequence}']/{{*}}Item"):
        uid = _xml_first(item, REFERENCED_SOP_INSTANCE_UID)
        if uid:
            listed[uid] = _number(_xml_first(item, code))
    return listed


def _xml_first(item: ElementTree.Element, tag: str) -> str | None:
    value = item.find(f"{{*}}DicomAttribute[@tag='{tag}']/{{*}}Value")
    return value.text.strip() if value is not None and value.text else None


def _found(body: bytes) -> set[str]:
    """The SOP Instance UIDs of a QIDO-RS answer in DICOM JSON."""
    try:
        matches = json.loads(body) if body.strip() else []
        return (
            {str(_json_first(match, SOP_INSTANCE_UID)) for match in matches}
            if isinstance(matches, list)
            else set()
        )
    except (ValueError, TypeError, AttributeError):
        return set()


def _number(value: object) -> int | None:
    if not isinstance(value, (str, int, float)):
        return None  # absent, or a list or object where a number belongs
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _seconds(retry_after: str | None) -> float:
    """A Retry-After header (RFC 9110 10.2.3: seconds, or an HTTP date) as seconds from now; 0 when absent or unreadable."""
    if not retry_after:
        return 0.0
    if retry_after.strip().isdigit():
        return float(retry_after.strip())
    try:
        return max(0.0, email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time())
    except (TypeError, ValueError):
        return 0.0


def _multipart(files: list[bytes], boundary: str) -> list[bytes]:
    """A multipart/related body (RFC 2387) of application/dicom parts (PS3.18 8.6.1.2), as chunks."""
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    chunks = [chunk for data in files for chunk in (head, data, b"\r\n")]
    return [*chunks, f"--{boundary}--\r\n".encode()]


def _instance(path: Path) -> tuple[str, bytes]:
    """An outbox file's SOP Instance UID and bytes; raises when it is not a PS3.10 file."""
    data = path.read_bytes()
    header = dcmread(io.BytesIO(data), stop_before_pixels=True)
    return str(header.SOPInstanceUID), data


def _authorization(destination: WebDestination) -> dict[str, str]:
    """The Authorization header for ``destination`` (RFC 7617 Basic, RFC 6750 Bearer), read afresh."""
    if destination.auth == "none":
        return {}
    secret = destination.read_secret()
    if destination.auth == "bearer":
        return {"Authorization": f"Bearer {secret}"}
    return {
        "Authorization": "Basic "
        + base64.b64encode(f"{destination.user}:{secret}".encode()).decode("ascii")
    }


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _why(exc: BaseException) -> str:
    """An exception as a fixed phrase (never a message a peer could have written): TLS by its reason, the rest by errno or type."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate not trusted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or type(exc).__name__}"
    return getattr(exc, "strerror", None) or type(exc).__name__
