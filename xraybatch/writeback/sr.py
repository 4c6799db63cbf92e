"""The Structured Report: a TID 1500 Measurement Report with one image-level group per model and target.

Each group (TID 1501) carries the finding as its Finding Type, the model that produced it as Algorithm
Identification, the source image, the probability and the operating threshold (``codes.DCM.Probability``
and ``codes.DCM.ThresholdValue``, UCUM "1"), and a qualitative
evaluation: SCT "Present" when the probability is at or above the threshold, else SCT "Absent". The NIH model's
"No Finding" output is not a finding: its group has no Finding Type and states "Impression = No abnormality"
(DCM 121073 = DCM 111286) only when the probability reaches the threshold.

The report is COMPLETE and UNVERIFIED. Its Qualitative Evaluations container (TID 1500 row 12) says, as TEXT
items, that it is AI generated and not for diagnostic use, and, when the binary model and the NIH model disagree
on Pneumonia, that they disagree. The Image Library (TID 1600) and the evidence list the source image, the
Secondary Capture and the parametric maps made with it. The procedure reported is SCT "Chest imaging" with SCT
"Plain radiography". Findings without a standard concept use the private scheme ``99XRAYBATCH``, declared in
the Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import cast

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.charset import default_encoding
from pydicom.sr.codedict import codes

from xraybatch.domain import Prediction
from xraybatch.models.findings import (
    IMPRESSION,
    NO_ABNORMALITY,
    NO_FINDING,
    PRIVATE_SCHEME,
    PRIVATE_SCHEME_NAME,
    PRIVATE_SCHEME_ORGANIZATION,
    PRIVATE_SCHEME_UID,
    TARGET_CODES,
    label,
)
from xraybatch.settings import OutputConfig
from xraybatch.writeback.common import (
    DISCLAIMER,
    MANUFACTURER,
    SERIES_DESCRIPTION,
    contributing_equipment,
    copy_series_context,
    derive_uid,
    device_serial_number,
    device_uid,
    instance_number,
    keep_identity,
    model_set,
    output_uids,
    set_equipment,
    software_versions,
    usable_source,
)

logger = logging.getLogger(__name__)

SERIES_NUMBER = 9902
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
PROCEDURE_REPORTED = (codes.SCT.ChestImaging, codes.SCT.PlainRadiography)
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = codes.DCM.Comment  # DCM 121106
# The concepts every group uses, converted once: highdicom turns a pydicom Code into a CodedConcept on each use,
# a sixth of the build time of 16 groups. They, the per-report items shared by the groups (the source image
# reference, each model's algorithm identification) and the per-process items shared by all reports (each
# target's finding type, threshold and evaluations) are never modified once built; the writer encodes a shared
# item in each place it appears, as it would separate copies.
_PROBABILITY = hd.sr.CodedConcept.from_code(codes.DCM.Probability)
_THRESHOLD = hd.sr.CodedConcept.from_code(codes.DCM.ThresholdValue)
_NO_UNITS = hd.sr.CodedConcept.from_code(codes.UCUM.NoUnits)
_PRESENT = hd.sr.CodedConcept.from_code(codes.SCT.Present)
_ABSENT = hd.sr.CodedConcept.from_code(codes.SCT.Absent)
_ENCODED = (False, True)  # (implicit VR, little endian): the SR's explicit VR little endian, see _as_encoded


def build_sr(
    source: Dataset,
    predictions: Sequence[Prediction],
    cfg: OutputConfig,
    references: Sequence[Dataset] = (),
) -> Dataset:
    """Build the Comprehensive 3D SR (PS3.3 A.35.13) holding a TID 1500 Measurement Report.

    Parameters
    ----------
    source
        The source image dataset (Pixel Data not needed); it is the evidence and the referenced image.
    predictions
        One prediction per model; every target becomes one measurement group.
    cfg
        The output settings (``institution``, ``uid_root``).
    references
        The Secondary Capture and parametric maps made from ``source``: listed in the Image Library and
        the evidence.

    Returns
    -------
    pydicom.Dataset
        The Comprehensive 3D SR that ``highdicom.sr.Comprehensive3DSR`` builds, in a new series of the source's
        study, as a plain dataset: read its content tree with ``hd.sr.Comprehensive3DSR.from_dataset``.

    Raises
    ------
    ValueError
        A target has no entry in ``TARGET_CODES``.
    """
    original = source
    source = usable_source(source)
    uids = output_uids(source, "sr", predictions, cfg.uid_root)
    source_image = hd.sr.SourceImageForMeasurementGroup.from_source_image(source)
    groups = []
    for p in predictions:
        algorithm = _algorithm(p)
        groups += [
            _group(source, source_image, algorithm, p, target, prob, thr, positive, cfg.uid_root)
            for target, prob, thr, positive in zip(p.targets, p.probabilities, p.thresholds, p.positive)
        ]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(predictions, cfg.uid_root),
        name=MANUFACTURER,
        manufacturer_name=MANUFACTURER,
        model_name=model_set(predictions)[:64],
        serial_number=device_serial_number(predictions),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(codes.DCM.Device, device)
        ),
        procedure_reported=list(PROCEDURE_REPORTED),
        imaging_measurements=groups,
        # highdicom describes image SOP classes it knows; a Parametric Map is listed in the evidence only
        referenced_images=[*_library_entry(source), *(r for r in references if r.SOPClassUID != PM_CLASS)]
        or None,
    )
    root = report[0]
    root.ContentSequence.append(_statements(predictions))
    used_schemes = {TARGET_CODES[t].scheme for p in predictions for t in p.targets}
    scheme = CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME, name=PRIVATE_SCHEME_NAME, responsible_organization=PRIVATE_SCHEME_ORGANIZATION
    )
    scheme.CodingSchemeUID = PRIVATE_SCHEME_UID  # highdicom sets the UID of registered schemes only
    schemes = [scheme]
    document = hd.sr.Comprehensive3DSR(
        evidence=[source, *references],
        content=_without_items(root),  # the items follow below, see _without_items
        series_instance_uid=uids.series_instance_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=instance_number(source, "sr"),
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_verified=False,
        is_final=True,
        institution_name=cfg.institution or source.get("InstitutionName") or None,
        contributing_equipment=contributing_equipment(source, predictions, cfg.institution, cfg.uid_root),
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=MANUFACTURER,
        software_versions=software_versions(predictions),
        coding_schemes=schemes if PRIVATE_SCHEME in used_schemes else None,
    )
    document.ContentSequence = root.ContentSequence
    _as_encoded(root.ContentSequence)
    sr = _plain(document)
    keep_identity(sr, original)
    copy_series_context(sr, source)
    if "Laterality" in sr:  # the SR Document Series has no Laterality
        del sr.Laterality
    if "BodyPartExamined" in sr:
        del sr.BodyPartExamined
    set_equipment(sr, predictions, cfg.uid_root)
    return sr


def disagreements(predictions: Sequence[Prediction]) -> list[str]:
    """Sentences for the findings that two models both report with opposite results.

    Parameters
    ----------
    predictions
        One prediction per model.

    Returns
    -------
    list of str
        For example ``"The models disagree on Pneumonia: pneumonia@2.0 0.83 (present, threshold 0.60),
        nih@1.2 0.12 (absent, threshold 0.50). The result of record is pneumonia's, the model trained for
        Pneumonia alone; the other is a secondary output"``; empty when they agree. The single-target model's
        call is the result of record wherever exactly one of the disagreeing models has that target alone.
    """
    by_target: dict[str, list[tuple[Prediction, int]]] = {}
    for p in predictions:
        for i, target in enumerate(p.targets):
            if target != NO_FINDING:
                by_target.setdefault(target, []).append((p, i))
    sentences = []
    for target, results in by_target.items():
        if len(results) > 1 and len({p.positive[i] for p, i in results}) > 1:
            parts = [
                f"{p.model_name}@{p.model_version} {p.probabilities[i]:.2f} "
                f"({'present' if p.positive[i] else 'absent'}, threshold {p.thresholds[i]:.2f})"
                for p, i in results
            ]
            sentence = f"The models disagree on {label(target)}: " + ", ".join(parts)
            dedicated = [p for p, _ in results if len(p.targets) == 1]
            if len(dedicated) == 1:  # one model was trained for this finding alone: its call is the one of record
                sentence += (f". The result of record is {dedicated[0].model_name}'s, the model trained for "
                             f"{label(target)} alone; the other is a secondary output")
            sentences.append(sentence)
    return sentences


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


def _statements(predictions: Sequence[Prediction]) -> hd.sr.ContainerContentItem:
    """The Qualitative Evaluations container: the disclaimer and any disagreement, as TEXT comments."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = [  # type: ignore[assignment]
        hd.sr.TextContentItem(
            name=COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        for text in (
            f"{DISCLAIMER}. Results of {model_set(predictions)}, not verified by a physician.",
            *disagreements(predictions),
        )
    ]
    return container


def _algorithm(prediction: Prediction) -> hd.sr.AlgorithmIdentification:
    """The TID 4019 Algorithm Identification of the model that made ``prediction``."""
    return hd.sr.AlgorithmIdentification(
        name=prediction.model_name, version=prediction.model_version, manufacturer=MANUFACTURER
    )


def _group(
    source: Dataset,
    source_image: hd.sr.SourceImageForMeasurementGroup,
    algorithm: hd.sr.AlgorithmIdentification,
    prediction: Prediction,
    target: str,
    probability: float,
    threshold: float,
    positive: bool,
    root: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One TID 1501 group: finding, algorithm, source image, probability, threshold, present/absent.

    ``source_image`` and ``algorithm`` are built once per report (:func:`build_sr`) and shared by its groups;
    the items that depend only on the target, its threshold and its result (:func:`_finding_type`,
    :func:`_threshold`, :func:`_evaluations`) are built once per process and shared by every report.
    """
    key = f"{prediction.model_name}@{prediction.model_version}/{target}"
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(root, "tracking", str(source.SOPInstanceUID), key), identifier=key
        ),
        finding_type=_finding_type(target),
        algorithm_id=algorithm,
        source_images=[source_image],
        measurements=[
            hd.sr.Measurement(name=_PROBABILITY, value=round(float(probability), 4), unit=_NO_UNITS),
            _threshold(round(float(threshold), 4)),
        ],
        qualitative_evaluations=list(_evaluations(target, positive)) or None,
    )


@functools.cache
def _finding_type(target: str) -> hd.sr.CodedConcept | None:
    """The group's Finding Type: the target's code; none for "No Finding", which is not a finding."""
    return None if target == NO_FINDING else finding_code(target)


@functools.cache
def _threshold(value: float) -> hd.sr.Measurement:
    """The operating threshold as a NUM item (shared: it is the same in every report of a model)."""
    return hd.sr.Measurement(name=_THRESHOLD, value=value, unit=_NO_UNITS)


@functools.cache
def _evaluations(target: str, positive: bool) -> tuple[hd.sr.QualitativeEvaluation, ...]:
    """Present or Absent for a finding; "Impression = No abnormality" for a positive "No Finding", else none."""
    finding = _finding_type(target)
    if finding is not None:
        return (hd.sr.QualitativeEvaluation(name=finding, value=_PRESENT if positive else _ABSENT),)
    if positive:
        return (hd.sr.QualitativeEvaluation(name=_concept(IMPRESSION), value=_concept(NO_ABNORMALITY)),)
    return ()


def _without_items(root: Dataset) -> Dataset:
    """The root container of the report without its content items, for ``hd.sr.Comprehensive3DSR``.

    The constructor copies the root's attributes into the document, and besides deep-copies the whole tree and
    parses the copy again into its ``content`` attribute (which nothing here reads: the written document holds
    the tree itself), and walks it for the instances it references, to check them against the evidence. For
    the 16 groups of two models that is two thirds of the SR's build time. Given the root without its items,
    it builds the same document (the evidence lists every instance given, referenced or not); ``build_sr``
    then attaches the items, whose references are all to the source and to the objects given as evidence.
    A test builds the report both ways and compares the encoded documents byte for byte.
    """
    shell = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            shell.add(element)
    shell.ContentSequence = []
    return shell


def _as_encoded(items: Sequence[Dataset]) -> None:
    """Mark every content item under ``items`` as already in explicit VR little endian, the SR's encoding.

    pydicom's writer runs its ambiguous-VR correction, which walks the whole subtree, on every dataset it writes
    whose original encoding is unknown: at every level of the content tree again, a quarter of the SR's encoding
    time. The content items are built here (no element read from a file, none of ambiguous VR), and the
    correction of the document itself still walks the whole tree once; ``Dataset.set_original_encoding`` is
    pydicom's way to say so. A test checks that the encoded document is the same byte for byte.

    An item already marked has had its whole subtree marked with it: the items shared between reports (three
    quarters of a report's items, see :func:`_group`) are walked once per process, not once per report.
    """
    stack: list[Dataset] = list(items)
    while stack:
        item = stack.pop()
        if item.original_encoding == _ENCODED:
            continue
        item.set_original_encoding(False, True, default_encoding)
        for element in item.elements():
            if element.VR == "SQ":
                stack.extend(cast("list[Dataset]", element.value))


def _plain(sr: Dataset) -> Dataset:
    """``sr``'s attributes and file meta in a plain ``pydicom.Dataset``, without highdicom's parsed copy of the
    content tree (which :func:`_without_items` leaves empty)."""
    plain = Dataset()
    for element in sr:
        plain.add(element)
    plain.file_meta = sr.file_meta
    plain.preamble = getattr(sr, "preamble", None)
    return plain


def _library_entry(source: Dataset) -> list[Dataset]:
    """The source as an Image Library entry when highdicom can describe it (TID 1603 needs both values of
    Patient Orientation and Imager Pixel Spacing of a projection radiograph); every group references it anyway.
    """
    orientation = source.get("PatientOrientation") or ()
    spacing = source.get("ImagerPixelSpacing") or ()
    return [source] if len(orientation) == 2 and len(spacing) == 2 else []


def _concept(code: object) -> hd.sr.CodedConcept:
    value, scheme, meaning = (getattr(code, k) for k in ("value", "scheme", "meaning"))
    return hd.sr.CodedConcept(value, scheme, meaning)
