"""The Structured Report: a TID 1500 Measurement Report in a Comprehensive SR (highdicom).

Pure: the source dataset, a :class:`~pacs_node.predictor.Prediction` and the model's
contract in, a validated dataset out. Two readers, two places (DICOM PS3.16, IHE AI Results;
the design and the viewer evidence are in docs/decisions.md):

* **Imaging Measurements**: what a viewer draws (OHIF draws every group of this container
  and needs coordinates in each). First the image-level result as a TID 1410 group whose
  region is the whole image: pneumonia with its certainty and the threshold it was decided
  at, named so that the viewer's label says what ("Pneumonia certainty (image)"), negative
  results included; an image outside the training distribution gets its score and the
  gate's threshold instead. Then one group per lesion region, a closed polyline on the
  source image, with the finding located there, the lung as finding site and the region's
  own score (the peak of the model's localisation map inside it, in [0, 1] and without units:
  not a probability), named after its finding
  ("Lobar pneumonia region score"). Regions only where the bundle's maps beat a fixed prior
  on held-out images; otherwise none, and a Comment (TEXT, TID 1500 row 14) among the
  Qualitative Evaluations says so.
* **Qualitative Evaluations**: the image-level classification, for machines and for
  viewers that list SR content: pneumonia Present / Absent (a negative result is recorded,
  not omitted) and each pneumonia class of the model, each with its Certainty of Finding
  and the Threshold Value it was decided at, so that "certainty 86 %, threshold 90 %:
  Absent" reads as the decision it is, not a contradiction; the triage flag with its
  threshold; for an image outside the training distribution, pneumonia Indeterminate,
  "within the training distribution: No" and the score, and no certainty at all.

A Device observer carries the model's name, version and a Device UID that changes with the
weights; Contributing Equipment names the algorithm; every private coding scheme used is
identified (Coding Scheme Identification Sequence). PRELIMINARY, UNVERIFIED, COMPLETE.
Comprehensive SR (not 3D): the coordinates are 2D, and it is the SR class PACS and
``storescu`` accept by default.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dp_model.contract import ModelContract
from pacs_node import codes
from pacs_node.model.predictor import Prediction
from pacs_node.results.base import DICOM, Result, ResultContext
from pacs_node.results.identity import MANUFACTURER, ResultIdentity, contributing_equipment
from pacs_node.status import FailReason

#: What this output's UIDs are derived under (:meth:`~pacs_node.results.identity.ResultIdentity.instance_uid`).
ROLE = "sr"

HAS_PROPERTIES = hd.sr.RelationshipTypeValues.HAS_PROPERTIES
CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS


def build_report(
    source: Dataset, prediction: Prediction, model: ModelContract, identity: ResultIdentity
) -> hd.sr.ComprehensiveSR:
    """The SR for one source image."""
    # The operating point travels with the decision it produced.
    parameters = [f"operating point {prediction.operating_point:g}"]
    if prediction.triage_point is not None:
        parameters.append(f"triage point {prediction.triage_point:g}")
    if prediction.ood_threshold is not None:
        parameters.append(f"out-of-distribution threshold {prediction.ood_threshold:g}")
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name, version=model.version, parameters=parameters
    )
    regions = (
        [
            _region_group(source, prediction, algorithm, identity, i)
            for i in range(len(prediction.boxes))
        ]
        if prediction.assessed
        else []
    )
    groups = [_image_group(source, prediction, algorithm, identity), *regions]
    content = _measurement_report(_observation_context(model), groups, _classification(prediction))
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=content,
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
    sr.SeriesDescription = identity.series_description("report")
    sr.ManufacturerModelName = model.name[:64]
    sr.SoftwareVersions = model.version[:64]
    codes.identify_schemes(sr)
    return sr


def _measurement_report(
    context: hd.sr.ObservationContext,
    groups: list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations],
    evaluations: hd.sr.ContainerContentItem,
) -> hd.sr.MeasurementReport:
    """TID 1500 with the measurement groups (row 6) and the Qualitative Evaluations (row 12)."""
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.PROCEDURE_CHEST_RADIOGRAPH,
        imaging_measurements=groups,
        title=codes.REPORT_TITLE,
    )
    report[0].ContentSequence.append(evaluations)  # highdicom builds row 6 only
    return report


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


def _num(
    name: Code,
    value: float,
    unit: Code,
    relationship: hd.sr.RelationshipTypeValues = HAS_PROPERTIES,
) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(
        name=name, value=round(float(value), 2), unit=unit, relationship_type=relationship
    )


def _evaluation(
    name: Code, value: Code, properties: list[hd.sr.NumContentItem]
) -> hd.sr.CodeContentItem:
    item = hd.sr.CodeContentItem(name=name, value=value, relationship_type=CONTAINS)
    if properties:
        item.ContentSequence = hd.sr.ContentSequence(properties)
    return item


def _decision(
    finding: Code, present: bool, probability: float, threshold: float | None
) -> hd.sr.CodeContentItem:
    """Present / Absent, with the certainty and the threshold it was decided at (None: no single threshold)."""
    properties = [_num(codes.CERTAINTY_OF_FINDING, 100.0 * probability, codes.PERCENT)]
    if threshold is not None:
        properties.append(_num(codes.THRESHOLD_VALUE, 100.0 * threshold, codes.PERCENT))
    return _evaluation(finding, codes.PRESENT if present else codes.ABSENT, properties)


def _classification(prediction: Prediction) -> hd.sr.ContainerContentItem:
    """The image-level results (TID 1500 row 12): one CODE per finding, negatives included."""
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS, relationship_type=CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(
        _assessed(prediction) if prediction.assessed else _not_assessed(prediction)
    )
    return container


def _assessed(prediction: Prediction) -> list[hd.sr.ContentItem]:
    # A class of a multi-label model is decided at the operating point on its own; a class of a
    # softmax model is the most probable one once pneumonia is present, so it has no threshold.
    class_threshold = prediction.operating_point if prediction.multi_label else None
    items: list[hd.sr.ContentItem] = [
        _decision(
            codes.PNEUMONIA,
            prediction.positive,
            prediction.pneumonia_probability,
            prediction.operating_point,
        ),
        *(
            _decision(
                codes.finding_code(label),
                prediction.present(label),
                prediction.probability(label),
                class_threshold,
            )
            for label in prediction.classes
            if label != prediction.normal_class
        ),
    ]
    if prediction.ood_threshold is not None:
        items.append(_evaluation(codes.WITHIN_DISTRIBUTION, codes.YES, _distribution(prediction)))
    if prediction.triage_point is not None:
        items.append(
            _evaluation(
                codes.TRIAGE_FLAG,
                codes.YES if prediction.triage else codes.NO,
                [_num(codes.THRESHOLD_VALUE, 100.0 * prediction.triage_point, codes.PERCENT)],
            )
        )
    if prediction.regions_withheld:
        # a positive result without regions says why, where regions would be expected
        items.append(
            hd.sr.TextContentItem(
                name=codes.COMMENT,
                value=prediction.regions_withheld[:1024],
                relationship_type=CONTAINS,
            )
        )
    return items


def _distribution(prediction: Prediction) -> list[hd.sr.NumContentItem]:
    """The out-of-distribution score and the gate's threshold (no units), when both are numbers."""
    values = [
        (codes.DISTRIBUTION_SCORE, prediction.ood_score),
        (codes.THRESHOLD_VALUE, prediction.ood_threshold),
    ]
    return [
        _num(name, value, codes.NO_UNITS)
        for name, value in values
        if value is not None and np.isfinite(value)
    ]


def _not_assessed(prediction: Prediction) -> list[hd.sr.ContentItem]:
    """An image outside the training distribution: pneumonia indeterminate, why (coded), no certainty."""
    return [
        _evaluation(codes.PNEUMONIA, codes.INDETERMINATE, []),
        _evaluation(codes.WITHIN_DISTRIBUTION, codes.NO, _distribution(prediction)),
    ]


def _region(source: Dataset, x0: float, y0: float, x1: float, y1: float) -> hd.sr.ImageRegion:
    """A box on the source image as a closed polyline (the first point again: viewers draw it open otherwise)."""
    outline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], np.float32)
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline,
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )


def _image_group(
    source: Dataset,
    prediction: Prediction,
    algorithm: hd.sr.AlgorithmIdentification,
    identity: ResultIdentity,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The image-level result as a region that is the whole image: what a viewer opens the SR on."""
    numbers: list[tuple[Code, float | None, Code]]
    if prediction.assessed:
        numbers = [
            (
                codes.image_score_code("pneumonia"),
                100.0 * prediction.pneumonia_probability,
                codes.PERCENT,
            ),
            (codes.THRESHOLD_VALUE, 100.0 * prediction.operating_point, codes.PERCENT),
        ]
        value = codes.PRESENT if prediction.positive else codes.ABSENT
    else:
        numbers = [
            (codes.DISTRIBUTION_SCORE, prediction.ood_score, codes.NO_UNITS),
            (codes.THRESHOLD_VALUE, prediction.ood_threshold, codes.NO_UNITS),
        ]
        value = codes.INDETERMINATE
    measured = [
        hd.sr.Measurement(name=name, value=round(float(v), 2), unit=unit, algorithm_id=algorithm)
        for name, v, unit in numbers
        if v is not None and np.isfinite(v)
    ]
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=identity.tracking_uid("pneumonia"), identifier="Pneumonia (whole image)"
        ),
        referenced_region=_region(source, 0.0, 0.0, float(source.Columns), float(source.Rows)),
        finding_type=codes.PNEUMONIA,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes.FINDING_SITE_LUNG)],
        measurements=measured,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=codes.PNEUMONIA, value=value)],
    )


def _region_group(
    source: Dataset,
    prediction: Prediction,
    algorithm: hd.sr.AlgorithmIdentification,
    identity: ResultIdentity,
    index: int,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
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
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=identity.tracking_uid(f"region-{index}"),
            identifier=f"{finding.meaning} region {index + 1}"[:64],
        ),
        referenced_region=_region(source, *(float(v) for v in prediction.boxes[index])),
        finding_type=finding,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes.FINDING_SITE_LUNG)],
        measurements=score,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=finding, value=codes.PRESENT)],
    )


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
