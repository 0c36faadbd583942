"""The Structured Report: a TID 1500 Measurement Report (highdicom), in Comprehensive SR and,
where a destination takes it, Comprehensive 3D SR.

Pure: the source dataset, a :class:`~pacs_node.model.prediction.Prediction` and the model's
contract in, a validated dataset out. Read by machines (highdicom's TID 1500 reader, IHE AI
Results displays), by generic SR renderers (dcmtk's ``dsr2html``) and by OHIF; every choice
and the PS3.16 rows it follows are in docs/decisions.md ("The SR says what it means"):

* **Image Library** (TID 1600): the source radiograph, its modality and size.
* **Imaging Measurements** (TID 1500 row 6): first the image-level result, a TID 1501
  Measurement Group on the source image (its "Source" IMAGE item), no region: Finding
  Pneumonia, the model's probability of pneumonia and of each pneumonia class as
  probabilities ("Probability of lobar pneumonia", percent), the Threshold Value pneumonia
  was decided at, and each decision Present / Absent as a qualitative evaluation (negatives
  stated, not omitted): for a multi-label model pneumonia and each finding, each decided at
  its operating point; for a single-label model pneumonia alone and, when present, the "Most
  probable pneumonia type" valued with the type's code (a type is chosen, never decided, so
  never stated Present or Absent); the verdict in words as a Comment. An image outside the training
  distribution gets the gate's score and threshold, no finding and no decision. The first
  number is INFERRED FROM the whole image's outline (TID 300, TID 320): what it was computed
  from, and what OHIF needs to show the group at all. Then one TID 1410 group per lesion
  region, a closed polyline on the source image, with the finding located there and the
  region's own score (the peak of the model's localisation map inside it, in [0, 1], no
  units: not a probability), tracked by :func:`~pacs_node.results.base.region_tracking_uid`
  as the presentation state tracks the same region. No finding site: a box is not known to
  lie on the lung.
* **Qualitative Evaluations** (TID 1500 row 12): the CAD Processing and Findings Summary
  (CID 6047: with findings, without findings, or, for an image not assessed, "No algorithms
  succeeded; without findings"), the triage flag as a SNOMED CT Priority, and a Comment
  (row 14) where regions are withheld or the image was not assessed.

Every container is SEPARATE (PS3.3 C.17.3.2.1): the items are a list of statements, not
running text, and generic renderers print each with its name. A Device observer carries
the model's name, version and a Device UID that changes with the weights; Contributing
Equipment names the algorithm; every private coding scheme used is identified.
PRELIMINARY, UNVERIFIED, COMPLETE.

SOP class: the writer makes a Comprehensive SR (its UID derived under :data:`ROLE`), which
every PACS takes; :func:`in_sop_class` gives the same report as a Comprehensive 3D SR (IHE
AIR's class) under a UID derived from the first, and the C-STORE sender uses that form for
a destination that accepts Comprehensive 3D SR (:mod:`pacs_node.delivery.cstore`).
"""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import UID

from dp_model.serving.contract import ModelContract
from pacs_node import codes
from pacs_node.model.predictor import Prediction
from pacs_node.results.base import (
    DICOM,
    Result,
    ResultContext,
    region_outline,
    region_tracking_uid,
)
from pacs_node.results.identity import MANUFACTURER, ResultIdentity, contributing_equipment
from pacs_node.results.overlay import verdict
from pacs_node.status import FailReason
from pacs_node.uids import derived_uid

#: What this output's UIDs are derived under (:meth:`~pacs_node.results.identity.ResultIdentity.instance_uid`).
ROLE = "sr"
#: What the Comprehensive 3D SR form's SOP Instance UID is derived under, from the Comprehensive SR's.
ROLE_3D = "sr3d"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"

#: A measurement group: the image-level one (TID 1501) or a lesion region's (TID 1410).
Group = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)
HAS_ACQ_CONTEXT = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS


def build_report(
    source: Dataset, prediction: Prediction, model: ModelContract, identity: ResultIdentity
) -> hd.sr.ComprehensiveSR:
    """The SR for one source image (Comprehensive SR; :func:`in_sop_class` for the 3D form)."""
    algorithm = _algorithm(prediction, model)
    regions = (
        [
            _region_group(source, prediction, algorithm, identity, i)
            for i in range(len(prediction.boxes))
        ]
        if prediction.assessed
        else []
    )
    groups: list[Group] = [_image_group(source, prediction, algorithm, identity), *regions]
    content = _measurement_report(
        _observation_context(model), _image_library(source), groups, _evaluations(prediction)
    )
    sr = _document(source, content, identity, model)
    sr.SeriesDescription = identity.series_description("report")
    sr.ManufacturerModelName = model.name[:64]
    sr.SoftwareVersions = model.version[:64]
    # Enhanced General Equipment (Type 1 in Comprehensive 3D SR): the same in both forms
    sr.DeviceSerialNumber = model.device_uid[:64]
    codes.identify_schemes(sr)
    _separate(sr)
    return sr


def _document(
    source: Dataset,
    content: hd.sr.MeasurementReport,
    identity: ResultIdentity,
    model: ModelContract,
) -> hd.sr.ComprehensiveSR:
    """highdicom's Comprehensive SR of ``content``, constructed around the root item alone,
    the root's items put in after.

    The constructor deep-copies the whole tree, converts the copy and searches the tree three
    times (the images it references, for the evidence; SCOORD3D items, which a Comprehensive
    SR may not hold): two thirds of a report's time, for answers known here. The tree
    references the source image alone, the ``evidence``, and holds 2D SCOORD only (PS3.3
    A.35.3). The document is the same, to the byte (tests/test_report_bytes.py): the
    constructor puts the root's own elements in the document, the items' Sequence itself,
    not a copy; and its content (what ``sr.content`` gives) is the measurement report built.
    """
    root = content[0]
    shell = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            shell.add(element)
    shell.ContentSequence = []
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=shell,
        series_instance_uid=identity.series_uid(ROLE),
        series_number=identity.SR_SERIES_NUMBER,
        sop_instance_uid=identity.instance_uid(ROLE),
        instance_number=identity.instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[contributing_equipment(model)],
    )
    sr["ContentSequence"] = root["ContentSequence"]
    sr._content = content  # what the constructor would have converted from a copy: built already
    return sr


def sop_instance_uid_in(uid: str, sop_class: str) -> str:
    """The SOP Instance UID of the report whose Comprehensive SR is ``uid``, in ``sop_class``.

    One SOP Instance UID names one SOP class (PS3.3 C.12.1.1.1), so the 3D form has a UID of
    its own, a pure function of the first: the same report is the same instance at a
    destination however often it is sent.
    """
    if sop_class == COMPREHENSIVE_SR:
        return uid
    if sop_class == COMPREHENSIVE_3D_SR:
        return derived_uid(uid, ROLE_3D)
    raise ValueError(f"not an SR class of the node's report: {sop_class!r}")


def in_sop_class(sr: Dataset, sop_class: str) -> Dataset:
    """The Comprehensive SR ``sr`` as an instance of ``sop_class``: the same content and
    header, its own SOP Instance UID. Both classes allow the report's 2D SCOORD (PS3.3
    A.35.3, A.35.13), so only the identifiers change; ``sr`` itself is left as it is."""
    if str(sr.SOPClassUID) != COMPREHENSIVE_SR:
        raise ValueError(f"not a Comprehensive SR: SOP Class UID {sr.SOPClassUID!r}")
    form = copy.deepcopy(sr)  # a few kilobytes; a shallow copy shares its elements with ``sr``
    form.SOPClassUID = form.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    form.SOPInstanceUID = form.file_meta.MediaStorageSOPInstanceUID = UID(
        sop_instance_uid_in(str(sr.SOPInstanceUID), sop_class)
    )
    return form


def _algorithm(prediction: Prediction, model: ModelContract) -> hd.sr.AlgorithmIdentification:
    """TID 4019, with the operating points that turned probabilities into decisions."""
    parameters = [f"operating point {prediction.operating_point:g}"]
    if prediction.triage_point is not None:
        parameters.append(f"triage point {prediction.triage_point:g}")
    if prediction.ood_threshold is not None:
        parameters.append(f"out-of-distribution threshold {prediction.ood_threshold:g}")
    return hd.sr.AlgorithmIdentification(
        name=model.name, version=model.version, parameters=parameters
    )


def _separate(sr: Dataset) -> None:
    """Every CONTAINER SEPARATE (PS3.3 C.17.3.2.1): its items are statements of their own,
    each shown with its name, not one running text. highdicom writes CONTINUOUS."""
    sr.ContinuityOfContent = "SEPARATE"
    pending = list(sr.ContentSequence)
    while pending:
        item = pending.pop()
        if item.ValueType == "CONTAINER":
            item.ContinuityOfContent = "SEPARATE"
        pending.extend(item.get("ContentSequence", []))


def _measurement_report(
    context: hd.sr.ObservationContext,
    library: hd.sr.ContainerContentItem,
    groups: list[Group],
    evaluations: hd.sr.ContainerContentItem,
) -> hd.sr.MeasurementReport:
    """TID 1500: the Image Library (row 5), the measurement groups (row 6) and the
    Qualitative Evaluations (row 12)."""
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.PROCEDURE_CHEST_RADIOGRAPH,
        imaging_measurements=groups,
        title=codes.REPORT_TITLE,
    )
    items = report[0].ContentSequence
    # highdicom's own library needs orientation and spacing that a radiograph may lack
    measurements = next(i for i, item in enumerate(items) if _is(item, codes.IMAGING_MEASUREMENTS))
    items.insert(measurements, library)
    items.append(evaluations)
    return report


def _is(item: Dataset, concept: Code) -> bool:
    name = item.ConceptNameCodeSequence[0]
    return (name.CodeValue, name.CodingSchemeDesignator) == (
        concept.value,
        concept.scheme_designator,
    )


def _container(name: Code, items: list[hd.sr.ContentItem]) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=name, relationship_type=CONTAINS, is_content_continuous=False
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _image_library(source: Dataset) -> hd.sr.ContainerContentItem:
    """TID 1600: one group, one entry, the source radiograph with the descriptors it is known
    by (TID 1602: modality, rows, columns); nothing stated that the source does not say."""
    entry = hd.sr.ImageContentItem(
        name=codes.SOURCE,
        referenced_sop_class_uid=str(source.SOPClassUID),
        referenced_sop_instance_uid=str(source.SOPInstanceUID),
        relationship_type=CONTAINS,
    )
    descriptors: list[hd.sr.ContentItem] = []
    modality = codes.MODALITIES.get(str(source.get("Modality", "")))
    if modality is not None:
        descriptors.append(
            hd.sr.CodeContentItem(
                name=codes.MODALITY, value=modality, relationship_type=HAS_ACQ_CONTEXT
            )
        )
    for name, size in (
        (codes.PIXEL_DATA_ROWS, source.Rows),
        (codes.PIXEL_DATA_COLUMNS, source.Columns),
    ):
        descriptors.append(
            hd.sr.NumContentItem(
                name=name, value=int(size), unit=codes.PIXELS, relationship_type=HAS_ACQ_CONTEXT
            )
        )
    entry.ContentSequence = hd.sr.ContentSequence(descriptors)
    return _container(codes.IMAGE_LIBRARY, [_container(codes.IMAGE_LIBRARY_GROUP, [entry])])


def _observation_context(model: ModelContract) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=model.device_uid,
        name=model.name[:64],
        manufacturer_name=MANUFACTURER,
        model_name=f"{model.name} {model.version}"[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DEVICE, observer_identifying_attributes=device
        )
    )


def _evaluations(prediction: Prediction) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: what the algorithm did (CID 6047), the triage priority, and why, in
    words, regions are withheld or the image was not assessed (row 14)."""
    if not prediction.assessed:
        summary = codes.NOT_ASSESSED
    else:
        summary = codes.WITH_FINDINGS if prediction.positive else codes.WITHOUT_FINDINGS
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=codes.CAD_PROCESSING_SUMMARY, value=summary, relationship_type=CONTAINS
        )
    ]
    if prediction.assessed and prediction.triage_point is not None:
        priority = codes.HIGH_PRIORITY if prediction.triage else codes.NORMAL_PRIORITY
        items.append(
            hd.sr.CodeContentItem(name=codes.PRIORITY, value=priority, relationship_type=CONTAINS)
        )
    remark = (
        prediction.regions_withheld
        if prediction.assessed
        else "Not assessed: the image lies outside the model's training distribution "
        "(its out-of-distribution score is above the gate's threshold, or not a number)."
    )
    if remark:
        items.append(
            hd.sr.TextContentItem(
                name=codes.COMMENT, value=remark[:1024], relationship_type=CONTAINS
            )
        )
    return _container(codes.QUALITATIVE_EVALUATIONS, items)


def _numbers(prediction: Prediction) -> list[tuple[Code, float | None, Code]]:
    """The image-level group's numbers: the probabilities and the operating point, or, for an
    image not assessed, the gate's score and threshold."""
    if not prediction.assessed:
        return [
            (codes.DISTRIBUTION_SCORE, prediction.ood_score, codes.NO_UNITS),
            (codes.THRESHOLD_VALUE, prediction.ood_threshold, codes.NO_UNITS),
        ]
    return [
        (
            codes.probability_code("pneumonia"),
            100.0 * prediction.pneumonia_probability,
            codes.PERCENT,
        ),
        (codes.THRESHOLD_VALUE, 100.0 * prediction.operating_point, codes.PERCENT),
        *(
            (codes.probability_code(label), 100.0 * prediction.probability(label), codes.PERCENT)
            for label in prediction.classes
            if label != prediction.normal_class
        ),
    ]


def _decisions(prediction: Prediction) -> list[hd.sr.QualitativeEvaluation]:
    """What the model decided (none for an image not assessed): pneumonia Present or Absent;
    for a multi-label model each finding too, at its own operating point; for a single-label
    one, when present, the most probable type (:func:`_most_probable`), no type decided."""
    if not prediction.assessed:
        return []
    decided = [(codes.PNEUMONIA, prediction.positive)]
    if prediction.multi_label:
        decided += [
            (codes.finding_code(label), prediction.present(label))
            for label in prediction.classes
            if label != prediction.normal_class
        ]
    return [
        hd.sr.QualitativeEvaluation(name=name, value=codes.PRESENT if present else codes.ABSENT)
        for name, present in decided
    ] + _most_probable(prediction)


def _most_probable(prediction: Prediction) -> list[hd.sr.QualitativeEvaluation]:
    """A single-label model's pneumonia type: "Most probable pneumonia type" valued with the
    type's code. The model chose it as the most probable pneumonia class, not at an operating
    point, so it is neither Present nor Absent (its probability is the group's number)."""
    chosen = prediction.most_probable_type
    if chosen is None:
        return []
    return [
        hd.sr.QualitativeEvaluation(name=codes.MOST_PROBABLE_TYPE, value=codes.finding_code(chosen))
    ]


def _image_group(
    source: Dataset,
    prediction: Prediction,
    algorithm: hd.sr.AlgorithmIdentification,
    identity: ResultIdentity,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The image-level result (TID 1501) on the source image, no region."""
    whole = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=region_outline(
            (0, 0, source.Columns, source.Rows), source.Rows, source.Columns
        ),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )
    measured = [
        (name, round(float(value), 2), unit)
        for name, value, unit in _numbers(prediction)
        if value is not None and np.isfinite(value)
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=identity.tracking_uid("pneumonia"),
            identifier=f"{'Pneumonia' if prediction.assessed else 'Not assessed'} (whole image)",
        ),
        finding_type=codes.PNEUMONIA if prediction.assessed else None,
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        # the first number is what the whole image gave
        measurements=[
            hd.sr.Measurement(
                name=name,
                value=value,
                unit=unit,
                referenced_coordinates=[whole] if i == 0 else None,
            )
            for i, (name, value, unit) in enumerate(measured)
        ],
        qualitative_evaluations=_decisions(prediction) or None,
    )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.COMMENT, value=verdict(prediction)[:1024], relationship_type=CONTAINS
        )
    )
    return group


def _region_group(
    source: Dataset,
    prediction: Prediction,
    algorithm: hd.sr.AlgorithmIdentification,
    identity: ResultIdentity,
    index: int,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """One lesion region (TID 1410): where, what, and the map's own score there."""
    label = prediction.region_label(index)
    finding = codes.finding_code(label)
    peak = prediction.region_score(index)
    # The map's peak in [0, 1], no units: it is not a probability, and a percent would read as one.
    score = (
        [
            hd.sr.Measurement(
                name=codes.region_score_code(label),
                value=round(peak, 4),
                unit=codes.NO_UNITS,
                algorithm_id=algorithm,
            )
        ]
        if np.isfinite(peak)
        else []
    )
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=region_outline(prediction.boxes[index], source.Rows, source.Columns),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=region_tracking_uid(identity, index),
            identifier=f"{finding.meaning} region {index + 1}"[:64],
        ),
        referenced_region=region,
        finding_type=finding,
        algorithm_id=algorithm,
        measurements=score,
        qualitative_evaluations=_region_decisions(prediction, finding),
    )


def _region_decisions(prediction: Prediction, finding: Code) -> list[hd.sr.QualitativeEvaluation]:
    """A region's finding Present where the model decided it (multi-label); for a single-label
    model, pneumonia Present and the region's finding as the most probable type."""
    if prediction.multi_label:
        return [hd.sr.QualitativeEvaluation(name=finding, value=codes.PRESENT)]
    return [
        hd.sr.QualitativeEvaluation(name=codes.PNEUMONIA, value=codes.PRESENT),
        hd.sr.QualitativeEvaluation(name=codes.MOST_PROBABLE_TYPE, value=finding),
    ]


class ReportWriter:
    """The ``sr`` output: the Structured Report (TID 1500) of one image."""

    media_type = DICOM
    kind, label, role, fail_reason = "sr", "SR", ROLE, FailReason.REPORT

    def build(self, context: ResultContext) -> Result:
        return Result.of_dataset(
            build_report(context.source, context.prediction, context.model, context.identity),
            self.kind,
            self.label,
        )
