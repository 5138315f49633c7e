"""A trained model as stock nnU-Net v2 and the SlicerNNUnet extension load it, with nothing of ours installed.

A model folder of a project holds much more than a model: uncertainty maps and
scores of every pool image, ``debug.json`` (host name, absolute paths), logs,
and checkpoints naming our trainer class ``nnUNetTrainerPartial``, which stock
nnU-Net cannot find (``nnUNetPredictor.initialize_from_trained_model_folder``
looks the checkpoint's ``trainer_name`` up among nnU-Net's own trainers). The
export holds exactly what inference reads, in nnU-Net's results layout::

    Dataset001_AL3D/nnUNetTrainer__<plans name>__<configuration>/
        dataset.json  plans.json  fold_<k>/checkpoint_final.pth

Each checkpoint is rewritten with the network weights, ``init_args`` (plans,
configuration, fold, dataset.json), ``inference_allowed_mirroring_axes`` and
``trainer_name = "nnUNetTrainer"``: our trainer changes training only (loss,
sampling, schedule), never ``build_network_architecture``, so the stock class
builds the same network from the exported plans (checked here by loading the
weights into it). Nothing is read through a symbolic link, and the zip is
written beside the destination and moved into place when complete.

Use it with ``nnUNet_results`` set to the unzipped folder::

    nnUNetv2_predict -d Dataset001_AL3D -c <configuration> -f <folds> -i IN -o OUT
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..fileio import JsonFileError, read_json_object, replacing_file
from .checkpoints import UnsafeCheckpoint, load_checkpoint
from .paths import DATASET_NAME

STOCK_TRAINER = "nnUNetTrainer"
CHECKPOINT = "checkpoint_final.pth"
FOLD_PATTERN = re.compile(r"fold_(\d+|all)")
DATASET_PATTERN = re.compile(r"Dataset\d{3}_[A-Za-z0-9_.-]+")
# what nnU-Net's predictor and LabelManager read from dataset.json; anything else (a case list) stays behind
DATASET_JSON_KEYS = (
    "name",
    "description",
    "channel_names",
    "modality",
    "labels",
    "regions_class_order",
    "numTraining",
    "file_ending",
    "overwrite_image_reader_writer",
)


class ExportError(ValueError):
    """The model folder cannot be exported (a one-line reason naming the file)."""


@dataclass(frozen=True)
class ExportedModel:
    """Where the export went, and what to pass to ``nnUNetv2_predict``."""

    archive: Path
    dataset: str
    folder: str  # <trainer>__<plans>__<configuration>, inside ``dataset``
    configuration: str
    folds: tuple[str, ...]

    def command(self) -> str:
        return (
            f"nnUNetv2_predict -d {self.dataset} -c {self.configuration} -f {' '.join(self.folds)} "
            f"-i INPUT_FOLDER -o OUTPUT_FOLDER"
        )


def _plain_file(root: Path, relative: str) -> Path | None:
    """``root/relative`` when it is a regular file reached through no symbolic link, else None."""
    path = root
    for part in Path(relative).parts:
        path = path / part
        if path.is_symlink():
            return None
    return path if path.is_file() else None


def _read_json_file(root: Path, name: str) -> dict:
    path = _plain_file(root, name)
    if path is None:
        raise ExportError(f"{root / name}: missing (or a symbolic link, which export never follows)")
    try:
        return read_json_object(path)
    except JsonFileError as e:
        raise ExportError(f"{path}: {e.problem}") from e
    except OSError as e:
        raise ExportError(f"{path}: unreadable ({e.strerror or e})") from e


def exported_folds(model_folder: Path | str, checkpoint: str = CHECKPOINT) -> list[str]:
    """Fold names (``"0"``, ``"all"``) with a finished checkpoint that is a regular file, not a link."""
    root = Path(model_folder)
    if not root.is_dir() or root.is_symlink():
        return []
    folds = [
        m.group(1)
        for d in root.iterdir()
        if (m := FOLD_PATTERN.fullmatch(d.name)) and _plain_file(root, f"{d.name}/{checkpoint}") is not None
    ]
    return sorted(folds, key=lambda f: (f == "all", int(f) if f.isdigit() else 0))


def _check_stock_network(plans: dict, configuration: str, dataset_json: dict, weights: dict, where: Path) -> None:
    """Stock nnU-Net's trainer builds a network that takes these weights exactly (what its predictor will do)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        plans_manager = PlansManager(plans)
        config = plans_manager.get_configuration(configuration)
        network = nnUNetTrainer.build_network_architecture(
            plans_manager,
            config,
            determine_num_input_channels(plans_manager, config, dataset_json),
            plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
            enable_deep_supervision=False,
        )
        network.load_state_dict(weights)
    except Exception as e:  # noqa: BLE001 - nnU-Net raises anything from KeyError to RuntimeError here
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"{where}: the weights do not fit stock nnU-Net's network for these plans ({first})") from e


def export_model(
    model_folder: Path | str, destination: Path | str, dataset_name: str = DATASET_NAME, checkpoint: str = CHECKPOINT
) -> ExportedModel:
    """Write ``destination`` (``.zip`` added when missing) holding the stock-loadable model; see the module docstring."""
    import torch

    model = Path(model_folder)
    if not DATASET_PATTERN.fullmatch(dataset_name):
        raise ExportError(f"dataset name {dataset_name!r}: nnU-Net needs DatasetNNN_Name")
    if model.is_symlink():
        raise ExportError(f"{model}: a symbolic link; export never follows one")
    folds = exported_folds(model, checkpoint)
    if not folds:
        raise ExportError(f"{model}: no finished fold yet ({checkpoint}); train a loop first")
    plans = _read_json_file(model, "plans.json")
    dataset_json = {k: v for k, v in _read_json_file(model, "dataset.json").items() if k in DATASET_JSON_KEYS}
    plans_name = plans.get("plans_name")
    if not isinstance(plans_name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", plans_name) or "__" in plans_name:
        raise ExportError(f"{model / 'plans.json'}: no usable plans_name ({plans_name!r})")
    plans = {**plans, "dataset_name": dataset_name}
    checkpoints: dict[str, dict] = {}
    configuration = mirror_axes = None
    for fold in folds:
        path = model / f"fold_{fold}" / checkpoint
        try:
            data = load_checkpoint(path)
        except UnsafeCheckpoint as e:
            raise ExportError(str(e)) from e
        init = data.get("init_args") or {}
        config = init.get("configuration")
        if configuration is None:
            configuration, mirror_axes = config, data.get("inference_allowed_mirroring_axes")
            if configuration not in plans.get("configurations", {}):
                raise ExportError(f"{path}: configuration {configuration!r} is not in {model / 'plans.json'}")
            _check_stock_network(plans, configuration, dataset_json, data["network_weights"], path)
        elif config != configuration:
            raise ExportError(f"{path}: configuration {config!r} differs from fold {folds[0]}'s {configuration!r}")
        checkpoints[fold] = {
            "network_weights": data["network_weights"],
            "init_args": {
                "plans": plans,
                "configuration": configuration,
                "fold": int(fold) if fold.isdigit() else fold,
                "dataset_json": dataset_json,
            },
            "trainer_name": STOCK_TRAINER,
            "inference_allowed_mirroring_axes": None if mirror_axes is None else tuple(int(a) for a in mirror_axes),
            "current_epoch": int(data.get("current_epoch", 0)),
        }
    folder = f"{STOCK_TRAINER}__{plans_name}__{configuration}"
    prefix = f"{dataset_name}/{folder}"
    destination = Path(destination)
    target = destination if destination.suffix.lower() == ".zip" else destination.with_name(destination.name + ".zip")
    if not target.parent.is_dir():
        raise ExportError(f"{target.parent}: no such folder")
    with replacing_file(target) as tmp:
        with open(tmp, "wb") as stream:
            with zipfile.ZipFile(stream, "w", zipfile.ZIP_DEFLATED) as archive:
                archive.writestr(f"{prefix}/dataset.json", json.dumps(dataset_json, indent=1) + "\n")
                archive.writestr(f"{prefix}/plans.json", json.dumps(plans, indent=1) + "\n")
                for fold, data in checkpoints.items():
                    buffer = io.BytesIO()
                    torch.save(data, buffer)
                    archive.writestr(f"{prefix}/fold_{fold}/{checkpoint}", buffer.getvalue())
            stream.flush()
            os.fsync(stream.fileno())
    return ExportedModel(target, dataset_name, folder, configuration, tuple(folds))
