"""The DICOM validators the node's objects are checked with, as functions that return a :class:`Report`.

* PixelMed's ``DicomSRValidator`` (Debian ``libpixelmed-java``): the content tree of a
  Structured Report against the PS3.16 templates and context groups. It does not check the
  header (that is ``dciodvfy``'s job).
* dicom3tools' ``dciodvfy``: one object against its IOD's modules and attributes (PS3.3).
* dicom3tools' ``dcentvfy``: the patient, study and series attributes of several objects agree
  (run on a source image and its results together).

A report keeps the tool's own lines, split into errors and warnings, so that a failing test
shows exactly what the tool said. A tool that could not check (a file it cannot read, an SR
it does not recognise) reports an error, never an empty report.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import require_file, require_tool

#: Debian's PixelMed; its manifest's Class-Path names the jars it needs.
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
#: DicomSRValidator over several files in one JVM (its own main takes one).
PIXELMED_DRIVER = Path(__file__).with_name("PixelMedSRValidator.java")
JAVA_OPTIONS = (
    # JDK 17.0.15 caps the operators of an XPath expression under secure processing; PixelMed's
    # compiled template stylesheet has more (JAXP0801003 when the validator is built): no cap.
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
    # The first compiler only and the serial collector: as fast here, at half the memory.
    "-XX:TieredStopAtLevel=1",
    "-XX:+UseSerialGC",
)
#: dicom3tools prefixes: ``Error - ...``, also after an element's tag (``(0x0010,0x0010) PN
#: Patient's Name - Error - ...``); ``Abort - ...`` when it could not read the file at all.
_DICOM3TOOLS_LINE = re.compile(r"(?:^|\s-\s)(Error|Abort|Warning) - ")


@dataclass(frozen=True)
class Report:
    """What one validator said about one object (or, for ``dcentvfy``, a set of objects).

    Attributes:
        tool: the validator's name.
        target: the file (or files) it checked.
        errors: its error lines, as it printed them.
        warnings: its warning lines, as it printed them.
        output: everything it printed, for a failing test's message.
    """

    tool: str
    target: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str = ""

    def __str__(self) -> str:
        return f"{self.tool} {self.target}:\n{self.output}"


def dciodvfy(path: str | Path) -> Report:
    """``dciodvfy``: the object at ``path`` against its IOD (PS3.3)."""
    return _dicom3tools("dciodvfy", [path])


def dcentvfy(paths: Iterable[str | Path]) -> Report:
    """``dcentvfy``: the patient, study and series attributes of ``paths`` agree with each other."""
    return _dicom3tools("dcentvfy", list(paths))


def _dicom3tools(tool: str, paths: list) -> Report:
    result = subprocess.run(
        [require_tool(tool, "dicom3tools"), *map(str, paths)], capture_output=True, timeout=120
    )
    output = _text(result.stdout + result.stderr)
    errors, warnings = [], []
    for line in output.splitlines():
        found = _DICOM3TOOLS_LINE.search(line)
        if found:
            (warnings if found.group(1) == "Warning" else errors).append(line)
    if result.returncode != 0 and not errors:
        errors.append(f"Error - {tool} exited with {result.returncode} and named no error")
    return Report(tool, " ".join(map(str, paths)), errors, warnings, output)


def pixelmed_sr(path: str | Path) -> Report:
    """PixelMed's ``DicomSRValidator``: the SR at ``path`` against the PS3.16 templates."""
    return pixelmed_sr_all([path])[Path(path)]


def pixelmed_sr_all(paths: Iterable[str | Path]) -> dict[Path, Report]:
    """:func:`pixelmed_sr` of each of ``paths``, in one JVM (building the validator takes seconds).

    Needs the JDK's source launcher (``java File.java``: Debian ``default-jdk-headless``).
    """
    paths = [Path(p) for p in paths]
    java = require_tool("java", "default-jdk-headless")
    jar = require_file(PIXELMED_JAR, "libpixelmed-java")
    result = subprocess.run(
        [java, *JAVA_OPTIONS, "-cp", str(jar), str(PIXELMED_DRIVER), *map(str, paths)],
        capture_output=True,
        timeout=600,
    )
    output = _text(result.stdout)
    if result.returncode != 0:
        pytest.fail(
            f"PixelMed's DicomSRValidator did not run ({result.returncode}; java needs the JDK's "
            f"source launcher, Debian default-jdk-headless):\n{output}\n{_text(result.stderr)}"
        )
    sections: dict[str, list[str]] = {}
    for line in output.splitlines():
        if line.startswith("==== "):
            section = sections.setdefault(line[5:], [])
        elif sections:
            section.append(line)
    return {path: _pixelmed_report(path, sections.get(str(path))) for path in paths}


def _pixelmed_report(path: Path, lines: list[str] | None) -> Report:
    """One file's section of the driver's output: ``Error: ...`` and ``Warning: ...`` lines.

    PixelMed says nothing wrong about an object it does not recognise as an SR, nor about one
    whose content it checked against no template; both are errors here.
    """
    if lines is None:
        return Report("DicomSRValidator", str(path), ["Error: no report for this file"])
    errors = [line for line in lines if line.startswith("Error:")]
    warnings = [line for line in lines if line.startswith("Warning:")]
    if "IOD (SOP Class) unrecognized" in lines:
        errors.append(
            "Error: not a Structured Report PixelMed knows (IOD (SOP Class) unrecognized)"
        )
    elif not any(line.startswith("Found Root Template") for line in lines):
        errors.append("Error: no root template found: the content was checked against none")
    return Report("DicomSRValidator", str(path), errors, warnings, "\n".join(lines))


def _text(data: bytes) -> str:
    """A tool's output as text; bytes that are not UTF-8 (a Latin-1 name) stay visible as ``\\xfc``."""
    return data.decode("utf-8", errors="backslashreplace")


#: Every warning the node's objects may get, by its text (``*``: any text, where a warning names
#: a file, a content item's position or the concept it is about), with why it stays.
ALLOWED_WARNINGS = {
    # dciodvfy
    (
        "Warning - Value dubious for this VR - (0x0008,0x0090) PN Referring Physician's Name  PN"
        " [1] = <ward> - Retired Person Name form"
    ): "RG1's own value, copied as received: results repeat the study's attributes (PS3.3 C.7.2.1)",
    (
        "Warning - Unrecognized defined term <99DPNEU> for value 1 of attribute <Coding Scheme"
        " Designator>"
    ): "the node's private scheme (PS3.16 8.2, '99'), in the Coding Scheme Identification Sequence",
    (
        "Warning - Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI Device UID "
    ): "Type 3 in the Contributing Equipment Sequence (PS3.3 C.12.1); dicom3tools 2022 lacks it",
    (
        "Warning - Dicom dataset contains attributes not present in standard DICOM IOD - this is a"
        " Standard Extended SOP Class"
    ): "the summary of the Device UID line; any other extra attribute has a line of its own",
    (
        "Warning - Attribute is not present in standard DICOM IOD - (0x0018,0x5101) CS View Position "
    ): "the source's view, kept in the SC for hanging protocols beside the View Code Sequence",
    # dcentvfy
    (
        "Warning - Different information entities for attribute - Element=<AccessionNumber> IE"
        " <*> versus <*> for file <**> versus <**>"
    ): "dcentvfy's tables: Series in image IODs, Study in SR; RG1's header relabelled SR gets it too",
    # PixelMed
    (
        'Warning: *: /CONTAINER (126000,DCM,"Imaging Measurement Report")/CONTAINER (126010,DCM,'
        '"Imaging Measurements")/CONTAINER (125007,DCM,"Measurement Group")/CODE (*): Content'
        " Item not in template"
    ): "TID 1410 takes qualitative evaluations (highdicom writes them); PixelMed 2022's has no row",
    (
        'Warning: *: /CONTAINER (126000,DCM,"Imaging Measurement Report")/CONTAINER (126010,DCM,'
        '"Imaging Measurements")/CONTAINER (125007,DCM,"Measurement Group")/TEXT (121106,DCM,'
        '"Comment"): Content Item not in template'
    ): "the verdict in words, which OHIF labels the image-level group with; TID 1501 has a Comment"
    " row that PixelMed 2022's copy lacks",
}

#: Error lines of a validator that are its own limits, not the object's faults: each with the
#: part of the standard that allows what the node wrote. Kept exact, so that any other error fails.
VALIDATOR_LIMITS = {
    (
        "Error: Template 1500 MeasurementReport/[Row 1] CONTAINER CID 7021/[Row 4] CODE (121058,DCM,"
        '"Procedure reported"): *: /CONTAINER (126000,DCM,"Imaging Measurement Report")/CODE'
        ' (121058,DCM,"Procedure reported"): Code (399208008,SCT,"Plain chest X-ray") not found in'
        " context group 100"
    ): "CID 100 is extensible (PS3.16; PixelMed's own table says extensible=T) and has no"
    " radiography code in its copy: the chest radiograph is named, not a generic Imaging procedure",
    **{
        (
            "Error: Template 1410 PlanarROIMeasurements/[Row 1] CONTAINER (125007,DCM,"
            f'"Measurement Group")/{row}: within 1.9.1: /CONTAINER (126000,DCM,"Imaging Measurement'
            ' Report")/CONTAINER (126010,DCM,"Imaging Measurements")/CONTAINER (125007,DCM,'
            '"Measurement Group"): Missing conditional content item'
        ): "PixelMed 2022 checks the image-level TID 1501 group (no region by design, PS3.16"
        " TID 1501) against TID 1410 when the report holds exactly one region group"
        for row in (
            '[Row 5] SCOORD (111030,DCM,"Image Region")',
            '[Row 7] IMAGE (121214,DCM,"Referenced Segmentation Frame")',
        )
    },
}


class KnownProblem(Exception):
    """A validator said only what a test lists as known for its case (tests/test_validators.py, ``TODAY``)."""


def matches(pattern: str, line: str) -> bool:
    """``line`` is ``pattern``, where each ``*`` of the pattern stands for any text without a
    ``/``: a ``*`` in a content item's path stands for one item, never for a deeper path;
    ``**`` stands for any text."""
    anything = [
        "[^/]*".join(map(re.escape, part.split("*"))) for part in pattern.split("**")
    ]  # ``**``: any text at all (a file's path)
    return re.fullmatch(".*".join(anything), line) is not None


def check(report: Report, known: list[str] | None = None) -> None:
    """No error and no warning but the allowed ones; :class:`KnownProblem` when what is left is ``known``."""
    problems = [
        error
        for error in report.errors
        if not any(matches(limit, error) for limit in VALIDATOR_LIMITS)
    ] + [
        warning
        for warning in report.warnings
        if not any(matches(allowed, warning) for allowed in ALLOWED_WARNINGS)
    ]
    if not problems:
        return
    if known and all(any(matches(line, problem) for line in known) for problem in problems):
        raise KnownProblem("\n".join(problems))
    message = "\n".join(problems)
    raise AssertionError(f"{report.tool} found (errors, or warnings not allowed):\n{message}")
