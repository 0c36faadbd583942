"""Results to a DICOM destination: C-STORE over one association per batch, C-FIND about objects in doubt."""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import _config
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated into the module at import, invisible to a checker
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
)

from pacs_node.config import Destination
from pacs_node.delivery.transport import STORED, Outcome, Status, Unreachable
from pacs_node.dimse_reactor import PromptAE
from pacs_node.logs import describe
from pacs_node.results.report import COMPREHENSIVE_3D_SR, COMPREHENSIVE_SR, in_sop_class

logger = logging.getLogger(__name__)

#: The storage classes the node sends, each offered in both uncompressed syntaxes. The report
#: is offered in both SR classes, each in a context of its own: the destination accepts or
#: rejects each (PS3.8 9.3.3.2), and gets the Comprehensive 3D SR where it accepts it
#: (:func:`_in_accepted_class`).
RESULT_CLASSES = (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    SecondaryCaptureImageStorage,
    GrayscaleSoftcopyPresentationStateStorage,
)
RESULT_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: C-STORE statuses that mean the destination has the object: success and the warnings
#: (coercion of data elements, elements discarded, data set does not match SOP class).
DELIVERED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
#: C-FIND statuses of a response that carries a match (PS3.4 C.4.1.1.4).
PENDING = frozenset({0xFF00, 0xFF01})


class CStoreTransport:
    """Associations with one DICOM destination.

    Args:
        destination: where to send.
        calling_ae: this node's AE title.
        tls: client TLS context, or None.
        timeout_s: ACSE, DIMSE and network timeout.
    """

    def __init__(
        self,
        destination: Destination,
        calling_ae: str,
        tls: ssl.SSLContext | None,
        timeout_s: float,
    ) -> None:
        self.destination, self.tls = destination, tls
        self._ae = PromptAE(ae_title=calling_ae)  # no 40 ms stall per C-STORE (dimse_reactor)
        # A file given to send_c_store() leaves as its bytes (CStoreLink._store); pynetdicom
        # has this as a global, as the listener's chunked receiving.
        _config.STORE_SEND_CHUNKED_DATASET = True
        self._opening = threading.Lock()
        for timeout in ("acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(self._ae, timeout, timeout_s)

    def open(self, ask: bool) -> CStoreLink:
        # the AE's requested contexts are set per association: one association at a time negotiates
        with self._opening:
            return self._open(ask)

    def _open(self, ask: bool) -> CStoreLink:
        self._ae.requested_contexts = []
        for sop_class in RESULT_CLASSES:
            self._ae.add_requested_context(sop_class, list(RESULT_SYNTAXES))
        # its own context: accepted or not on its own
        self._ae.add_requested_context(SecondaryCaptureImageStorage, [JPEGLSLossless])
        if ask:  # to ask the destination whether it has objects in doubt, where it answers queries
            self._ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        tls_args = (self.tls, self.destination.host) if self.tls else None
        assoc = self._ae.associate(
            self.destination.host,
            self.destination.port,
            ae_title=self.destination.ae_title,
            tls_args=tls_args,
        )
        if not assoc.is_established:
            raise Unreachable(
                "association rejected"
                if assoc.is_rejected
                else "no connection, or the association was aborted"
            )
        return CStoreLink(assoc, str(self.destination))


class CStoreLink:
    """One association: a C-STORE per object."""

    def __init__(self, assoc: Association, name: str) -> None:
        self.assoc, self.name = assoc, name

    @property
    def usable(self) -> bool:
        return self.assoc.is_established

    def groups(self, files: list[Path]) -> list[list[Path]]:
        return [[path] for path in files]

    def send(self, group: list[Path], on_wire: Callable[[list[Path]], None]) -> dict[Path, Outcome]:
        return {path: self._store(path, on_wire) for path in group}

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()

    def has(self, path: Path) -> bool:
        """Whether the destination already stores an object whose C-STORE was cut by a crash
        (PS3.4 C.4.1, Study Root C-FIND at IMAGE level); False when it cannot say."""
        if not any(
            cx.abstract_syntax == StudyRootQueryRetrieveInformationModelFind
            for cx in self.assoc.accepted_contexts
        ):
            return False
        try:
            header = _in_accepted_class(self.assoc, dcmread(path, stop_before_pixels=True))
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID, query.SeriesInstanceUID, query.SOPInstanceUID = (
                header.StudyInstanceUID,
                header.SeriesInstanceUID,
                header.SOPInstanceUID,
            )
            answers = list(
                self.assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            )
        except Exception as exc:  # noqa: BLE001 - a destination that cannot answer gets the object again
            logger.info(
                "%s: could not ask whether %s arrived (%s); sending it again",
                self.name,
                path.stem,
                describe(exc),
            )
            return False
        uid = str(header.SOPInstanceUID)
        return any(
            status
            and int(status.Status) in PENDING
            and found is not None
            and str(found.get("SOPInstanceUID", "")).strip(" \x00") == uid
            for status, found in answers
        )  # a match for this very instance, not whatever a lax PACS returns

    def _store(self, path: Path, on_wire: Callable[[list[Path]], None]) -> Outcome:
        try:
            meta = read_file_meta_info(path)
            sop_class, syntax = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
            # The file's own bytes where the destination takes it as it is (they were checked
            # against their digest): decoding them only to encode them again cost as much as
            # building the result. Otherwise the object, to be changed for the destination.
            dataset = None if _as_it_is(self.assoc, sop_class, syntax) else dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError) as exc:
            return Outcome(
                Status.REJECTED, "unreadable", f"unreadable outbox file ({type(exc).__name__})"
            )
        sent: Path | Dataset = path
        if dataset is not None:
            changed = self._for_destination(dataset)
            if isinstance(changed, Outcome):
                return changed
            sent = changed
        on_wire([path])
        try:
            status = self.assoc.send_c_store(sent)
        except Exception as exc:  # noqa: BLE001 - an object pynetdicom cannot send is refused, not fatal
            return Outcome(Status.REFUSED, "send-error", f"sending failed ({describe(exc)})")
        return _outcome(status)

    def _for_destination(self, dataset: Dataset) -> Dataset | Outcome:
        """``dataset`` in a class and syntax the destination accepted (a report as Comprehensive
        3D SR, pixels decompressed), or the rejection when it accepted none for it."""
        sent = _in_accepted_class(self.assoc, dataset)
        if sent is not dataset:  # the audit and the ledger name the report by its first UID
            logger.info(
                "%s: report %s sent as Comprehensive 3D SR %s",
                self.name,
                dataset.SOPInstanceUID,
                sent.SOPInstanceUID,
            )
            dataset = sent
        if not _accepted(self.assoc, dataset) and dataset.file_meta.TransferSyntaxUID.is_compressed:
            # the same instance, the same pixels, uncompressed
            dataset.decompress(generate_instance_uid=False)
            dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if not _accepted(self.assoc, dataset):
            name, syntax = (
                UID(str(dataset.SOPClassUID)).name,
                UID(str(dataset.file_meta.TransferSyntaxUID)).name,
            )
            return Outcome(
                Status.REJECTED,
                "sop-class-not-accepted",
                f"the destination accepts no presentation context for {name} in {syntax}",
            )
        return dataset


def _outcome(status: Dataset | None) -> Outcome:
    """The outcome of a C-STORE response (PS3.4 B.2.3); none at all: the association broke."""
    if not status:
        return Outcome(Status.UNANSWERED, detail="no response to C-STORE")
    code = getattr(status, "Status", None)
    if code is None:
        return Outcome(Status.REFUSED, "refused", "C-STORE response without a status")
    if int(code) in DELIVERED:
        return STORED
    return Outcome(Status.REFUSED, "refused", f"C-STORE status 0x{int(code):04X}")


def _as_it_is(assoc: Association, sop_class: str, syntax: str) -> bool:
    """Whether an object of ``sop_class`` in ``syntax`` goes to the destination unchanged: in
    a context it accepted, and not a report it gets as Comprehensive 3D SR (:func:`_in_accepted_class`)."""
    return not _as_3d_sr(assoc, sop_class, syntax) and _accepts(assoc, sop_class, syntax)


def _as_3d_sr(assoc: Association, sop_class: str, syntax: str) -> bool:
    """Whether a report goes as Comprehensive 3D SR: a Comprehensive SR, and the destination
    accepted the 3D class in the same syntax."""
    return sop_class == COMPREHENSIVE_SR and _accepts(assoc, COMPREHENSIVE_3D_SR, syntax)


def _accepted(assoc: Association, dataset: Dataset) -> bool:
    """Whether the association has an accepted context for the object's SOP class and transfer syntax."""
    return _accepts(assoc, str(dataset.SOPClassUID), str(dataset.file_meta.TransferSyntaxUID))


def _accepts(assoc: Association, sop_class: str, syntax: str) -> bool:
    return any(
        str(cx.abstract_syntax) == sop_class and syntax in [str(t) for t in cx.transfer_syntax]
        for cx in assoc.accepted_contexts
    )


def _in_accepted_class(assoc: Association, dataset: Dataset) -> Dataset:
    """The report as a Comprehensive 3D SR where the destination accepted that class (IHE AI
    Results asks for it), else as it is, a Comprehensive SR: decided per destination and
    association, from the contexts it accepted. Both carry the same content; the 3D form has
    a SOP Instance UID of its own, derived from the first (:func:`~pacs_node.results.report.in_sop_class`)."""
    if not _as_3d_sr(assoc, str(dataset.SOPClassUID), str(dataset.file_meta.TransferSyntaxUID)):
        return dataset
    return in_sop_class(dataset, COMPREHENSIVE_3D_SR)
