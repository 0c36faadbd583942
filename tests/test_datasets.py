"""Dataset adapters on small files written in each public layout, awkward parts included."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import write_dicom
from PIL import Image

from dp_model.datasets import DatasetError, detect_layout, read_dataset, split_dataset
from dp_model.datasets.records import ChestDataset, Record
from dp_model.datasets.splits import patient_split, stratified_split
from dp_transforms import LoadChestXrayd


def png(path: Path, size: int = 32, rgb: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.tile(np.arange(size, dtype=np.uint8) * 4, (size, 1))
    Image.fromarray(np.stack([pixels] * 3, -1) if rgb else pixels).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.lstrip("\n"))
    return path


# --- Deep Pneumonia layout --------------------------------------------------------------


@pytest.fixture
def deep_pneumonia(tmp_path: Path) -> Path:
    root = tmp_path / "dp"
    write(root / "classes.txt", "normal\nlobar\npatchy\ninterstitial\ncavitary\n")
    write(
        root / "labels.csv",
        """
image_id,label,patient_id
img001,0,P1
img002,lobar,P1
img003,2,P2
img004,4,P3
""",
    )
    write(
        root / "boxes.csv",
        """
image_id,x_min,y_min,x_max,y_max
img002,10,12,20,30
img003,1,1,5,5
img003,20.5,20,30,31.25
""",
    )
    for name in ("img001.png", "img002.png", "sub/img003.png"):
        png(root / "images" / name)
    write_dicom(root / "images" / "img004.dcm", np.zeros((32, 32), np.uint16), bits=12)
    return root


def test_deep_pneumonia_layout(deep_pneumonia: Path) -> None:
    assert detect_layout(deep_pneumonia) == "deep-pneumonia"
    ds = read_dataset(deep_pneumonia)
    assert ds.classes == ("normal", "lobar", "patchy", "interstitial", "cavitary")
    assert not ds.multi_label
    by_id = {r.image_id: r for r in ds}
    assert by_id["img001"].labels == ("normal",) and by_id["img001"].boxes.shape == (0, 4)
    assert by_id["img002"].labels == ("lobar",) and by_id["img002"].patient_id == "P1"
    np.testing.assert_allclose(by_id["img003"].boxes, [[1, 1, 5, 5], [20.5, 20, 30, 31.25]])
    assert by_id["img003"].box_labels == ("patchy", "patchy")
    assert by_id["img004"].boxes.shape == (0, 4)  # a lesion nobody outlined is kept
    assert by_id["img004"].image.suffix == ".dcm"
    np.testing.assert_array_equal(ds.targets(), [0, 1, 2, 4])
    assert ds.class_counts() == {
        "normal": 1,
        "lobar": 1,
        "patchy": 1,
        "interstitial": 0,
        "cavitary": 1,
    }


@pytest.mark.parametrize(
    ("file", "text", "message"),
    [
        (
            "boxes.csv",
            "image_id,x_min,y_min,x_max,y_max\nimg999,1,1,2,2\n",
            r"boxes.csv:2: box for image 'img999'",
        ),
        (
            "boxes.csv",
            "image_id,x_min,y_min,x_max,y_max\nimg001,1,1,2,2\n",
            "labelled 'normal' but has boxes",
        ),
        (
            "boxes.csv",
            "image_id,x_min,y_min,x_max,y_max\nimg002,5,1,2,2\n",
            r"boxes.csv:2: empty or inverted box",
        ),
        (
            "boxes.csv",
            "image_id,x_min,y_min,x_max\nimg002,5,1,2\n",
            r"missing column\(s\) \['y_max'\]",
        ),
        ("labels.csv", "image_id,label\nimg001,7\n", r"labels.csv:2: label '7' is neither"),
        ("labels.csv", "image_id,label\nimg001,0\nimg001,0\n", "listed twice"),
        ("labels.csv", "image_id,label\nimg042,0\n", "no file for image 'img042'"),
        (
            "boxes.csv",
            "image_id,x_min,y_min,x_max,y_max\nimg002,a,1,2,2\n",
            r"boxes.csv:2: column 'x_min' is not a number: 'a'",
        ),
    ],
)
def test_deep_pneumonia_errors_name_file_and_line(
    deep_pneumonia: Path, file: str, text: str, message: str
) -> None:
    write(deep_pneumonia / file, text)
    with pytest.raises(DatasetError, match=message):
        read_dataset(deep_pneumonia)


# --- RSNA Pneumonia Detection Challenge --------------------------------------------------

RSNA_IDS = (
    "0004cfab-14fd-4e49-80ba-63a80b6bddd6",
    "00313ee0-9eaa-42f4-b0ab-c148ed3241cd",
    "00436515-870c-4b36-a041-de91049b9ab4",
    "003d8fa0-6bf1-40ed-b54c-ac657f8495c5",
)


@pytest.fixture
def rsna(tmp_path: Path) -> Path:
    root = tmp_path / "rsna"
    a, b, c, d = RSNA_IDS
    write(
        root / "stage_2_train_labels.csv",
        f"""
patientId,x,y,width,height,Target
{a},,,,,0
{b},,,,,0
{c},264.0,152.0,213.0,379.0,1
{c},562.0,152.0,256.0,453.0,1
{d},,,,,0
""",
    )
    # As in the real file, the detailed classes repeat once per row of the labels file.
    write(
        root / "stage_2_detailed_class_info.csv",
        f"""
patientId,class
{a},No Lung Opacity / Not Normal
{b},No Lung Opacity / Not Normal
{c},Lung Opacity
{c},Lung Opacity
{d},Normal
""",
    )
    for patient in RSNA_IDS:
        write_dicom(
            root / "stage_2_train_images" / f"{patient}.dcm",
            np.zeros((64, 64), np.uint8),
            PatientID=patient,
        )
    return root


def test_rsna_layout_with_several_boxes_per_patient(rsna: Path) -> None:
    assert detect_layout(rsna) == "rsna"
    ds = read_dataset(rsna)
    assert len(ds) == 4
    by_id = {r.image_id: r for r in ds}
    opacity = by_id[RSNA_IDS[2]]
    assert opacity.labels == ("Lung Opacity",)
    np.testing.assert_allclose(opacity.boxes, [[264, 152, 477, 531], [562, 152, 818, 605]])
    assert by_id[RSNA_IDS[0]].labels == ("No Lung Opacity / Not Normal",)
    assert by_id[RSNA_IDS[3]].labels == ("Normal",) and by_id[RSNA_IDS[3]].boxes.shape == (0, 4)
    assert all(r.patient_id == r.image_id for r in ds)


def test_rsna_images_of_one_patient_are_grouped_by_their_dicom_patient_id(rsna: Path) -> None:
    """Each patientId names an image; the file's Patient ID names the patient, so a split
    keeps two images of one person on one side."""
    a, b, c, _ = RSNA_IDS
    for image in (a, b):
        write_dicom(
            rsna / "stage_2_train_images" / f"{image}.dcm",
            np.zeros((64, 64), np.uint8),
            PatientID="SAME-PERSON",
        )
    # unreadable: its image id stands in
    (rsna / "stage_2_train_images" / f"{c}.dcm").write_bytes(b"not a DICOM file")
    by_id = {r.image_id: r for r in read_dataset(rsna)}
    assert by_id[a].patient_id == by_id[b].patient_id == "SAME-PERSON"
    assert by_id[c].patient_id == c
    for seed in range(6):
        split = split_dataset(read_dataset(rsna), 0.4, seed=seed, method="patient")
        sides = {
            index in split.test
            for index, record in enumerate(read_dataset(rsna).records)
            if record.image_id in (a, b)
        }
        assert len(sides) == 1


def test_rsna_target_and_class_must_agree(rsna: Path) -> None:
    path = rsna / "stage_2_detailed_class_info.csv"
    path.write_text(path.read_text().replace(",Normal\n", ",Lung Opacity\n"))
    with pytest.raises(DatasetError, match="Target 0 but class 'Lung Opacity'"):
        read_dataset(rsna)


def test_rsna_missing_dicom_file(rsna: Path) -> None:
    (rsna / "stage_2_train_images" / f"{RSNA_IDS[1]}.dcm").unlink()
    with pytest.raises(DatasetError, match=f"no DICOM file {RSNA_IDS[1]}.dcm"):
        read_dataset(rsna)


# --- NIH ChestX-ray14 ------------------------------------------------------------------------


@pytest.fixture
def nih(tmp_path: Path) -> Path:
    root = tmp_path / "nih"
    # The real header: "[Width,Height]" splits into two columns, and a trailing comma.
    write(
        root / "Data_Entry_2017.csv",
        """
Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],
00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,
00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143,
00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171,
00000003_000.png,Hernia,0,3,81,F,PA,2582,2991,0.143,0.143,
00000004_000.png,Mass|Nodule,0,4,82,M,AP,2500,2048,0.168,0.168,
00000005_000.png,Infiltration,0,5,69,F,PA,2048,2500,0.168,0.168,
00000099_000.png,No Finding,0,99,40,F,PA,2048,2500,0.168,0.168,
""",
    )
    write(
        root / "BBox_List_2017.csv",
        """
Image Index,Finding Label,Bbox [x,y,w,h],,,
00000004_000.png,Mass,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661,,,
00000004_000.png,Nodule,686.067796610169,131.07118644067,185.491525423729,313.491525423729,,,
00000005_000.png,Infiltrate,100,100,50,60,,,
""",
    )
    write(
        root / "train_val_list.txt",
        "00000001_000.png\n00000001_001.png\n00000002_000.png\n00000003_000.png\n",
    )
    write(root / "test_list.txt", "00000004_000.png\n00000005_000.png\n")
    for index, name in enumerate(
        (
            "00000001_000",
            "00000001_001",
            "00000002_000",
            "00000003_000",
            "00000004_000",
            "00000005_000",
        )
    ):
        png(root / f"images_00{1 + index // 3}" / "images" / f"{name}.png", rgb=index == 0)
    return root


def test_nih_multilabel_boxes_aliases_and_missing_images(
    nih: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert detect_layout(nih) == "nih"
    with caplog.at_level(logging.WARNING):
        ds = read_dataset(nih)
    assert "1 of 7 listed images are not on disk" in caplog.text
    assert ds.multi_label and len(ds.classes) == 14 and len(ds) == 6
    by_id = {r.image_id: r for r in ds}
    assert by_id["00000001_001.png"].labels == ("Cardiomegaly", "Emphysema")
    assert by_id["00000002_000.png"].labels == ()
    assert by_id["00000001_000.png"].patient_id == by_id["00000001_001.png"].patient_id == "1"
    mass = by_id["00000004_000.png"]
    assert mass.box_labels == ("Mass", "Nodule")
    np.testing.assert_allclose(mass.boxes[0], [225.0847, 547.0192, 311.8644, 626.2057], atol=1e-3)
    assert by_id["00000005_000.png"].box_labels == ("Infiltration",)
    assert by_id["00000004_000.png"].split == "test" and by_id["00000003_000.png"].split == "train"
    targets = ds.targets()
    assert targets.shape == (6, 14) and targets[1].sum() == 2 and targets[2].sum() == 0


def test_nih_unknown_finding(nih: Path) -> None:
    path = nih / "Data_Entry_2017.csv"
    path.write_text(path.read_text().replace("Hernia", "Hernias"))
    with pytest.raises(DatasetError, match=r"Data_Entry_2017.csv:5: unknown finding 'Hernias'"):
        read_dataset(nih)


# --- Pediatric pneumonia folders -----------------------------------------------------------


@pytest.fixture
def pediatric(tmp_path: Path) -> Path:
    root = tmp_path / "chest_xray"
    for path in (
        "train/NORMAL/IM-0115-0001.jpeg",
        "train/NORMAL/NORMAL2-IM-1427-0001.jpeg",
        "train/PNEUMONIA/person1_bacteria_1.jpeg",
        "train/PNEUMONIA/person1_bacteria_2.jpeg",
        "train/PNEUMONIA/person1000_virus_1681.jpeg",
        "test/NORMAL/IM-0001-0001.jpeg",
        "test/PNEUMONIA/person100_bacteria_475.jpeg",
        "val/PNEUMONIA/person1946_bacteria_4874.jpeg",
    ):
        png(root / path, rgb="virus" in path)  # some real files are RGB JPEGs of gray images
    (root / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\0")
    return root


def test_pediatric_folders_names_and_patients(pediatric: Path) -> None:
    assert detect_layout(pediatric) == "pediatric"
    ds = read_dataset(pediatric)
    assert ds.classes == ("normal", "bacterial", "viral") and len(ds) == 8
    by_id = {r.image_id: r for r in ds}
    assert by_id["person1000_virus_1681"].labels == ("viral",)
    assert by_id["person1_bacteria_2"].patient_id == "person1"
    assert by_id["NORMAL2-IM-1427-0001"].patient_id == "NORMAL2-IM-1427"
    assert by_id["IM-0115-0001"].labels == ("normal",) and by_id["IM-0115-0001"].split == "train"
    assert by_id["person1946_bacteria_4874"].split == "val"
    assert LoadChestXrayd("image")({"image": by_id["person1000_virus_1681"].image})[
        "image"
    ].shape == (1, 32, 32)


def test_pediatric_two_classes(pediatric: Path) -> None:
    from dp_model.datasets import pediatric as reader

    ds = reader.read(pediatric, classes="two")
    assert ds.classes == ("NORMAL", "PNEUMONIA")
    assert Counter(r.labels[0] for r in ds) == {"NORMAL": 3, "PNEUMONIA": 5}


# --- Generic CSV ------------------------------------------------------------------------------


def test_generic_csv_single_label_with_boxes(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    png(tmp_path / "img" / "b.png")
    csv = write(
        tmp_path / "data.csv",
        """
image,label,patient_id,x_min,y_min,x_max,y_max
a.png,normal,p1,,,,
img/b.png,pneumonia,p2,1,2,10,12
img/b.png,pneumonia,p2,15,15,20,25
""",
    )
    assert detect_layout(csv) == "csv"
    ds = read_dataset(csv)
    assert ds.classes == ("normal", "pneumonia") and not ds.multi_label
    assert len(ds) == 2 and ds.records[1].boxes.shape == (2, 4)
    assert ds.records[1].box_labels == ("pneumonia", "pneumonia")


def test_generic_csv_multi_label_and_classes_file(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    write(tmp_path / "classes.txt", "effusion\nnodule\nmass\n")
    csv = write(
        tmp_path / "data.csv",
        "image,label,box_label,x_min,y_min,x_max,y_max\na.png,effusion|mass,mass,1,1,5,5\nb.png,,,,,,\n",
    )
    ds = read_dataset(csv)
    assert ds.multi_label and ds.classes == ("effusion", "nodule", "mass")
    np.testing.assert_array_equal(ds.targets(), [[1, 0, 1], [0, 0, 0]])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("image,label,x_min,y_min,x_max,y_max\na.png,x,1,1,,\n", r"data.csv:2: a box needs all of"),
        (
            "image,label,patient_id\na.png,x,p1\na.png,x,p2\n",
            r"data.csv:3: 'patient_id' differs from line 2",
        ),
        ("image,label\nmissing.png,x\n", "image file 'missing.png' not found"),
        ("image,diagnosis\na.png,x\n", r"missing column\(s\) \['label'\]"),
    ],
)
def test_generic_csv_errors(tmp_path: Path, text: str, message: str) -> None:
    png(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=message):
        read_dataset(write(tmp_path / "data.csv", text))


def test_unknown_layout_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="layout not recognised"):
        read_dataset(tmp_path)


# --- Splits -----------------------------------------------------------------------------------


def long_tailed(n_per_class: dict[str, int], patients: bool) -> ChestDataset:
    records, index = [], 0
    for label, n in n_per_class.items():
        for _ in range(n):
            patient = f"p{index // 3}" if patients else None  # three images per patient
            records.append(
                Record(Path(f"{index}.png"), (label,), patient_id=patient, image_id=str(index))
            )
            index += 1
    return ChestDataset(
        name="test",
        root=Path("."),
        classes=tuple(n_per_class),
        multi_label=False,
        records=tuple(records),
    )


def test_stratified_split_takes_ten_percent_of_every_class() -> None:
    ds = long_tailed({"normal": 500, "a": 200, "b": 110, "c": 60, "d": 25}, patients=False)
    split = split_dataset(ds, 0.1, seed=1)
    assert split.method == "stratified"
    test_counts = ds.class_counts(split.test)
    assert test_counts == {"normal": 50, "a": 20, "b": 11, "c": 6, "d": 2}
    assert set(split.train).isdisjoint(split.test) and len(split.train) + len(split.test) == len(ds)
    assert split_dataset(ds, 0.1, seed=1) == split and split_dataset(ds, 0.1, seed=2) != split


def test_patient_split_never_puts_a_patient_on_both_sides() -> None:
    ds = long_tailed({"normal": 600, "a": 240, "b": 90, "c": 30}, patients=True)
    split = split_dataset(ds, 0.1, seed=0)
    assert split.method == "patient"
    train_patients = {ds.records[i].patient_id for i in split.train}
    test_patients = {ds.records[i].patient_id for i in split.test}
    assert train_patients.isdisjoint(test_patients)
    fraction = len(split.test) / len(ds)
    assert 0.08 <= fraction <= 0.13
    assert all(count > 0 for count in ds.class_counts(split.test).values())


def test_patient_split_needs_patient_ids_and_official_split_needs_splits() -> None:
    ds = long_tailed({"normal": 10, "a": 10}, patients=False)
    with pytest.raises(DatasetError, match="no patient id"):
        patient_split(ds, 0.1, 0)
    with pytest.raises(DatasetError, match="in no official split"):
        split_dataset(ds, method="official")
    assert stratified_split(ds, 0.1, 0).test  # the fallback works


def test_official_split_of_the_pediatric_folders(pediatric: Path) -> None:
    ds = read_dataset(pediatric)
    split = split_dataset(ds, method="official")
    assert sorted(ds.records[i].split for i in split.test) == ["test", "test", "val"]
