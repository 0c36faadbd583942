"""MONAI bundles: what ``dp-train`` writes and what the node and ``dp-train evaluate`` load.

Layout::

    configs/metadata.json        MONAI metadata (validated offline against the vendored
                                 schema) plus the model contract under "deep_pneumonia"
    configs/inference.json       python -m monai.bundle run --config_file configs/inference.json
    configs/evaluate.json        metrics on a dataset split
    configs/train.json           re-runs the training (train#trainer, train#handlers)
    configs/multi_gpu_train.json torchrun overrides (DDP)
    configs/logging.conf
    models/model.pt              plain CPU state dict (torch.load(..., weights_only=True))
    models/model.ts              TorchScript export of the classifier
    models/model.onnx            the node's forward pass (logits, maps, the gate's features)
                                 for ONNX Runtime (dp_model.serving.onnx_graph); its SHA-256 in the contract
    models/ood.pt                feature statistics of the out-of-distribution gate
    models/ood.npz               the same statistics for NumPy (dp_model.serving.gate), which the node
                                 serving model.onnx reads; its SHA-256 in the contract
    docs/README.md               the model card, with plots
    samples/                     a few images for the inference config to run on
    LICENSE

Reading a bundle back lives in :mod:`dp_model.serving.loading` and running one in
:mod:`dp_model.serving.inference`; their names are importable from here as well.

Bundle configs can execute code: load only bundles from people you trust.
"""

from __future__ import annotations

import json
import logging
import platform
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .contract import ModelContract

# named by the configs of bundles written before 2026-12-01
from .inference import Predictor as Predictor
from .loading import IMAGE_SUFFIXES as IMAGE_SUFFIXES
from .loading import SCHEMA_FILE as SCHEMA_FILE
from .loading import BundleError as BundleError
from .loading import load_bundle as load_bundle
from .loading import load_feature_statistics as load_feature_statistics
from .loading import validate_metadata
from .loading import weights_uid as weights_uid

logger = logging.getLogger(__name__)

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
PAPER = "X. Wei, X. Niu, X. Zhang, Y. Li. Deep Pneumonia: Attention-Based Contrastive Learning for Class-Imbalanced Pneumonia Lesion Recognition in Chest X-rays. 2022."


# --- writing ----------------------------------------------------------------------------------------


def write_model(root: Path, model: nn.Module, image_size: int) -> dict[str, torch.Tensor]:
    """``models/model.pt`` (plain CPU state dict, no wrapper prefixes) and ``models/model.ts``."""
    model = model.eval().cpu()
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.save(state, root / "models" / "model.pt")
    example = torch.rand(1, 1, image_size, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is what deployment
        # tools (and MONAI's ckpt_export) load today; the notice is not for our users.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
        # CIA-Net's negative bank size is a constant of the trained model; tracing it is right.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(str(root / "models" / "model.ts"))
    return state


def write_metadata(
    root: Path,
    contract: ModelContract,
    description: str,
    metrics: dict[str, float],
    data_source: str,
) -> Path:
    """``configs/metadata.json``, validated against the vendored schema."""
    channel_def = {str(i): name for i, name in enumerate(contract.output_classes)}
    outputs = len(contract.output_classes)
    pred = (
        "sigmoid probability of each finding, in channel_def order; none above the operating point means normal"
        if contract.multi_label
        else "softmax probability of each class, in label_classes order"
    )
    versions = {
        name: _version(name)
        for name in ("deep-pneumonia", "pydicom", "pylibjpeg", "SimpleITK", "torchvision")
    }
    meta = {
        "schema": SCHEMA_URL,
        "version": contract.version,
        "changelog": {contract.version: "trained with dp-train"},
        "monai_version": _version("monai"),
        "pytorch_version": torch.__version__,
        "numpy_version": np.__version__,
        "required_packages_version": versions,
        "name": contract.name,
        "task": "Pneumonia type recognition on frontal chest radiographs",
        "description": description,
        "authors": "Deep Pneumonia developers",
        "copyright": "Copyright Deep Pneumonia developers, Apache-2.0",
        "data_source": data_source,
        "data_type": "dicom",
        "image_classes": "single-channel frontal chest radiograph, letterboxed, intensities in [0, 1], larger is brighter",
        "label_classes": ", ".join(f"{i}: {name}" for i, name in enumerate(contract.classes)),
        "pred_classes": pred,
        "eval_metrics": {k: round(float(v), 4) for k, v in metrics.items()},
        "intended_use": "Research and software testing only. Not a medical device; not for clinical decisions.",
        "references": [PAPER],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "num_channels": 1,
                    "spatial_shape": [contract.image_size, contract.image_size],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "X-ray"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": outputs,
                    "spatial_shape": [outputs],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": channel_def,
                }
            },
        },
        "deep_pneumonia": contract.to_json(),
        "platform": platform.platform(),
    }
    path = root / "configs" / "metadata.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=2) + "\n")
    validate_metadata(path)
    return path


def _version(name: str) -> str:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def write_configs(root: Path, contract: ModelContract, train_config: dict) -> None:
    """The MONAI bundle configs: inference, evaluate, train, multi-GPU train, logging."""
    configs = root / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    common = {
        "imports": ["$import torch", "$import dp_model.serving.inference"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": {
            "_target_": "dp_model.networks.architectures.build_network",
            "architecture": contract.architecture,
            "num_classes": len(contract.output_classes),
            "attention_stages": list(contract.attention_stages),
            **contract.options,
        },
        "network": "$@network_def.to(@device)",
    }
    inference = common | {
        "input_dir": "$@bundle_root + '/samples'",
        "output_dir": "$@bundle_root + '/eval'",
        "predictor": {
            "_target_": "dp_model.serving.inference.Predictor",
            "bundle_root": "@bundle_root",
            "network": "@network",
            "device": "@device",
        },
        "run": ["$@predictor.predict_folder(@input_dir, @output_dir)"],
    }
    evaluate = common | {
        "dataset_dir": "",
        "output_dir": "$@bundle_root + '/eval'",
        "evaluator": {
            "_target_": "dp_model.serving.inference.Predictor",
            "bundle_root": "@bundle_root",
            "network": "@network",
            "device": "@device",
        },
        "run": ["$@evaluator.evaluate_dataset(@dataset_dir, @output_dir)"],
    }
    train = {
        "imports": ["$import dp_model.training.run"],
        "bundle_root": ".",
        "config": train_config,
        "train": {
            "trainer": {
                "_target_": "dp_model.training.run.BundleTrainer",
                "config": "@config",
                "bundle_root": "@bundle_root",
            },
            "handlers": [],
        },
        "validate": {"evaluator": "$None"},
        "run": ["$@train#trainer.run()"],
    }
    multi_gpu = {"config": {"runtime": {"device": "cuda"}}}
    for name, content in (
        ("inference", inference),
        ("evaluate", evaluate),
        ("train", train),
        ("multi_gpu_train", multi_gpu),
    ):
        (configs / f"{name}.json").write_text(json.dumps(content, indent=2) + "\n")
    (configs / "logging.conf").write_text(LOGGING_CONF)


LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

LICENSE = """Copyright Deep Pneumonia developers

Licensed under the Apache License, Version 2.0 (the "License");
you may not use these files except in compliance with the License.
You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software
distributed under the License is distributed on an "AS IS" BASIS,
WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and
limitations under the License.

The weights are not a medical device and are not for clinical use.
"""


#: What a sample image keeps (an allow-list, after PS3.15's Basic Profile): what the pixels
#: need to be read as the node reads them, and nothing that names or dates a patient, a visit,
#: a device or a site.
KEPT = (
    "SOPClassUID",
    "Modality",
    "ImageType",
    "BodyPartExamined",
    "ViewPosition",
    "PatientOrientation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PlanarConfiguration",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "PresentationLUTShape",
    "PixelIntensityRelationship",
    "PixelIntensityRelationshipSign",
    "LossyImageCompression",
    "PixelData",
)
#: Type 2 attributes of the modules a CR/DX image needs: present, empty.
EMPTIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "SeriesNumber",
    "InstanceNumber",
    "Manufacturer",
)


#: Beside the samples: each one's ground truth (its labels and its lesion boxes in its own pixels).
SAMPLES_TRUTH = "truth.json"


def write_samples(
    root: Path, images: list[Path], truths: list[dict] | None = None
) -> dict[str, dict]:
    """A few images for ``inference.json`` to run on out of the box, without patient data.

    DICOM files are rebuilt from an allow-list (:data:`KEPT`) with new UIDs; an image with
    annotations burned in is left out. Other images are decoded and written again (pixels and
    spacing only). File names are ``sample-N`` (names like an RSNA patientId identify a patient).
    ``truths`` (one per image: ``labels`` and ``boxes``, ``[x_min, y_min, x_max, y_max]`` in the
    image's pixels) go to ``samples/truth.json`` by file name, so that a reader can set the
    node's answer beside the truth; they are returned as written (empty without ``truths``).
    """
    folder = root / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    number, written = 0, {}
    for i, image in enumerate(images):
        suffix = image.suffix.lower()
        target = folder / f"sample-{number + 1}{suffix}"
        if suffix in (".dcm", ".dicom"):
            ds = _deidentified(image)
            if ds is None:
                continue
            ds.save_as(target, enforce_file_format=True)
        else:
            _pixels_only(image, target)
        if truths is not None:
            written[target.name] = truths[i]
        number += 1
    if written:
        (folder / SAMPLES_TRUTH).write_text(json.dumps(written, indent=2) + "\n")
    return written


def _deidentified(path: Path):
    """A new data set holding only :data:`KEPT` from ``path``; None when annotations are burned in."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    source = dcmread(path)
    if str(source.get("BurnedInAnnotation", "")).upper() == "YES":
        logger.info("%s: annotations burned into the pixels; not shipped as a sample", path.name)
        return None
    ds = Dataset()
    for keyword in KEPT:
        if keyword in source:
            ds[keyword] = source[keyword]
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        # a spacing of 0 (as some files hold) is no spacing
        if keyword in ds and not all(float(v) > 0 for v in (ds[keyword].value or [0])):
            del ds[keyword]
    if str(ds.get("VOILUTFunction", "")).strip().upper() == "LINEAR":
        # the default when absent; OHIF 3.13 refuses the image when it is stated
        del ds.VOILUTFunction
    for keyword in EMPTIED:
        setattr(ds, keyword, "")
    ds.PatientName, ds.PatientID = "SAMPLE^IMAGE", "SAMPLE"
    ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", "dp-train: allow-list, new UIDs"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
        ds.SOPClassUID,
        ds.SOPInstanceUID,
    )
    ds.file_meta.TransferSyntaxUID = source.file_meta.TransferSyntaxUID
    return ds


def _pixels_only(image: Path, target: Path) -> None:
    """Pixels (and spacing) written again: no header field of the original travels."""
    import SimpleITK as sitk

    read = sitk.ReadImage(str(image))
    clean = sitk.GetImageFromArray(
        sitk.GetArrayFromImage(read), isVector=read.GetNumberOfComponentsPerPixel() > 1
    )
    clean.SetSpacing(read.GetSpacing())
    sitk.WriteImage(clean, str(target))
