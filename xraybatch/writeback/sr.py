"""The Structured Report: a TID 1500 Measurement Report with one image-level group per model and target.

Each group (TID 1501) carries the finding as its Finding Type, the model as Algorithm Identification, the source
image, the probability and the operating threshold (DCM 122157 "Probability" and DCM 122411 "Threshold
Value", UCUM "1"), and a qualitative evaluation: SCT "Present" when the probability is at or above the
threshold, else SCT "Absent". The procedure reported is SCT 413815006 "Chest imaging (procedure)" with SCT
168537006 "Plain radiography". Findings without a SNOMED CT concept use the private scheme ``99XRAYBATCH``,
declared in the Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from xraybatch.domain import Prediction
from xraybatch.models.findings import PRIVATE_SCHEME, PRIVATE_SCHEME_NAME, TARGET_CODES
from xraybatch.settings import OutputConfig
from xraybatch.writeback.common import (
    MANUFACTURER,
    SERIES_DESCRIPTION,
    contributing_equipment,
    model_set,
    output_uids,
    software_versions,
    usable_source,
)

logger = logging.getLogger(__name__)

SERIES_NUMBER = 9902
PROCEDURE_REPORTED = (codes.SCT.ChestImaging, codes.SCT.PlainRadiography)


def build_sr(source: Dataset, predictions: Sequence[Prediction], cfg: OutputConfig) -> Dataset:
    """Build the Comprehensive 3D SR (PS3.3 A.35.13) holding a TID 1500 Measurement Report.

    Parameters
    ----------
    source
        The source image dataset (Pixel Data not needed); it is the evidence and the referenced image.
    predictions
        One prediction per model; every target becomes one measurement group.
    cfg
        The output settings (``institution``).

    Returns
    -------
    pydicom.Dataset
        A ``highdicom.sr.Comprehensive3DSR`` in a new series of the source's study.

    Raises
    ------
    ValueError
        A target has no entry in ``TARGET_CODES``.
    """
    source = usable_source(source)
    uids = output_uids(source, "sr", predictions)
    groups = [
        _group(source, p, target, prob, thr, positive)
        for p in predictions
        for target, prob, thr, positive in zip(p.targets, p.probabilities, p.thresholds, p.positive)
    ]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[MANUFACTURER, model_set(predictions)]),
        name=MANUFACTURER,
        manufacturer_name=MANUFACTURER,
        model_name=model_set(predictions)[:64],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(codes.DCM.Device, device)
        ),
        procedure_reported=list(PROCEDURE_REPORTED),
        imaging_measurements=groups,
    )
    used_schemes = {TARGET_CODES[t].scheme for p in predictions for t in p.targets}
    schemes = [
        CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME, name=PRIVATE_SCHEME_NAME, responsible_organization=MANUFACTURER
        )
    ]
    return hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=uids.series_instance_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        institution_name=cfg.institution or source.get("InstitutionName") or None,
        contributing_equipment=contributing_equipment(source, predictions, cfg.institution),
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=MANUFACTURER,
        software_versions=software_versions(predictions),
        coding_schemes=schemes if PRIVATE_SCHEME in used_schemes else None,
    )


def finding_code(target: str) -> hd.sr.CodedConcept:
    """The coded concept of a model target, from ``TARGET_CODES``.

    Parameters
    ----------
    target
        A target name as the model spells it.

    Returns
    -------
    highdicom.sr.CodedConcept

    Raises
    ------
    ValueError
        The target has no entry in ``TARGET_CODES``.
    """
    try:
        code = TARGET_CODES[target]
    except KeyError:
        raise ValueError(
            f"target {target!r} has no code; add it to TARGET_CODES in xraybatch/models/findings.py"
        ) from None
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def _group(
    source: Dataset, prediction: Prediction, target: str, probability: float, threshold: float, positive: bool
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One TID 1501 group: finding, algorithm, source image, probability, threshold, present/absent."""
    finding = finding_code(target)
    key = f"{prediction.model_name}@{prediction.model_version}/{target}"
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[str(source.SOPInstanceUID), key]), identifier=key
        ),
        finding_type=finding,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=prediction.model_name,
            version=prediction.model_version,
            manufacturer=MANUFACTURER,
        ),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=[
            hd.sr.Measurement(name=codes.DCM.Probability, value=float(probability), unit=codes.UCUM.NoUnits),
            hd.sr.Measurement(name=codes.DCM.ThresholdValue, value=float(threshold), unit=codes.UCUM.NoUnits),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=finding, value=codes.SCT.Present if positive else codes.SCT.Absent
            )
        ],
    )
