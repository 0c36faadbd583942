"""The Structured Report: a TID 1500 Measurement Report in a Comprehensive 3D SR (highdicom).

Pure: the source dataset, a :class:`~pacs_node.predictor.Prediction` and the model's
contract in, a validated dataset out. Content, following DICOM PS3.16 and IHE AI Results:

* procedure reported: the chest radiograph (not the algorithm);
* one TID 1501 image-level group for pneumonia (the probability of any pneumonia, present
  or absent at the operating point: a negative result is recorded, not omitted), and one
  per pneumonia class of the model, each with its Certainty of Finding (DCM 111012); a
  multi-label model decides each class present or absent on its own;
* for an image outside the model's training distribution, instead of all these: one group
  with pneumonia Indeterminate, "within the training distribution: No" and the score;
  no certainty is stated for an image the model cannot judge;
* a triage flag (Yes / No) in the pneumonia group when the bundle has a triage point;
* one TID 1410 planar ROI group per lesion region, a closed polyline on the source image,
  with the finding the model located there;
* a Device observer carrying the model's name, version and a Device UID that changes
  with the weights; Contributing Equipment names the algorithm;
* PRELIMINARY, UNVERIFIED, COMPLETE.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dp_model.contract import ModelContract

from . import codes
from .identity import MANUFACTURER, ResultIdentity, contributing_equipment
from .predictor import Prediction


def build_report(source: Dataset, prediction: Prediction, model: ModelContract, identity: ResultIdentity) -> hd.sr.Comprehensive3DSR:
    """The SR for one source image."""
    # The operating point travels with the decision it produced.
    parameters = [f"operating point {prediction.operating_point:g}"]
    if prediction.triage_point is not None:
        parameters.append(f"triage point {prediction.triage_point:g}")
    if prediction.ood_threshold is not None:
        parameters.append(f"out-of-distribution threshold {prediction.ood_threshold:g}")
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version, parameters=parameters)
    if not prediction.assessed:
        groups = [_not_assessed_group(source, prediction, algorithm, identity)]
    else:
        groups = [
            _image_group(source, codes.PNEUMONIA, prediction.pneumonia_probability, prediction.positive, algorithm, identity, "pneumonia", _flags(prediction)),
            *(
                _image_group(source, codes.finding_code(label), prediction.probability(label), prediction.present(label), algorithm, identity, label)
                for label in prediction.classes
                if label != prediction.normal_class
            ),
            *(_region_group(source, box, prediction, algorithm, identity, i) for i, box in enumerate(prediction.boxes)),
        ]
    content = hd.sr.MeasurementReport(
        observation_context=_observation_context(model),
        procedure_reported=codes.PROCEDURE_CHEST_RADIOGRAPH,
        imaging_measurements=groups,
        title=codes.REPORT_TITLE,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=content,
        series_instance_uid=identity.sr_series_uid,
        series_number=identity.SR_SERIES_NUMBER,
        sop_instance_uid=identity.sr_uid,
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
    return sr


def _observation_context(model: ModelContract) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=model.device_uid, name=model.name[:64], manufacturer_name=MANUFACTURER, model_name=f"{model.name} {model.version}"[:64]
    )
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(observer_type=codes.DEVICE, observer_identifying_attributes=device))


def _certainty(probability: float, algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=codes.CERTAINTY_OF_FINDING, value=round(100.0 * probability, 2), unit=codes.PERCENT, algorithm_id=algorithm)


def _presence(finding: Code, present: bool) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(name=finding, value=codes.PRESENT if present else codes.ABSENT)


def _flags(prediction: Prediction) -> list[hd.sr.QualitativeEvaluation]:
    """The image was assessed; and the triage flag, where the bundle has a triage point."""
    flags = [hd.sr.QualitativeEvaluation(name=codes.WITHIN_DISTRIBUTION, value=codes.YES)] if prediction.ood_threshold is not None else []
    if prediction.triage_point is not None:
        flags.append(hd.sr.QualitativeEvaluation(name=codes.TRIAGE_FLAG, value=codes.YES if prediction.triage else codes.NO))
    return flags


def _image_group(
    source: Dataset, finding: Code, probability: float, present: bool, algorithm: hd.sr.AlgorithmIdentification, identity: ResultIdentity, key: str,
    extra: list[hd.sr.QualitativeEvaluation] | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.tracking_uid(key), identifier=f"{finding.meaning} (image)"[:64]),
        finding_type=finding,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes.FINDING_SITE_LUNG)],
        measurements=[_certainty(probability, algorithm)],
        qualitative_evaluations=[_presence(finding, present), *(extra or [])],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )  # fmt: skip


def _not_assessed_group(source: Dataset, prediction: Prediction, algorithm: hd.sr.AlgorithmIdentification, identity: ResultIdentity) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """An image outside the training distribution: pneumonia indeterminate, why (coded), no certainty."""
    score = float(prediction.ood_score) if prediction.ood_score is not None else float("nan")
    measured = [hd.sr.Measurement(name=codes.DISTRIBUTION_SCORE, value=round(score, 2), unit=codes.NO_UNITS, algorithm_id=algorithm)] if np.isfinite(score) else []
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.tracking_uid("pneumonia"), identifier="Pneumonia (image, not assessed)"),
        finding_type=codes.PNEUMONIA,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes.FINDING_SITE_LUNG)],
        measurements=measured,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=codes.PNEUMONIA, value=codes.INDETERMINATE),
            hd.sr.QualitativeEvaluation(name=codes.WITHIN_DISTRIBUTION, value=codes.NO),
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )


def _region_group(
    source: Dataset, box: np.ndarray, prediction: Prediction, algorithm: hd.sr.AlgorithmIdentification, identity: ResultIdentity, index: int
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    x0, y0, x1, y1 = (float(v) for v in box)
    outline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], np.float32)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline,
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )
    label = prediction.box_labels[index] if prediction.box_labels else prediction.label
    finding = codes.finding_code(label)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.tracking_uid(f"region-{index}"), identifier=f"Lesion region {index + 1}"),
        referenced_region=region,
        finding_type=finding,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes.FINDING_SITE_LUNG)],
        measurements=[_certainty(prediction.probability(label), algorithm)],
        qualitative_evaluations=[_presence(finding, True)],
    )
