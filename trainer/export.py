"""Export: a self-contained, checksummed model directory that serving and evaluation load safely.

``RUN_DIR/export/<tag>/`` holds

- ``model.pt``: the fp32 state dict (tensors only, loadable with ``weights_only=True``)
- ``config.yaml`` and ``config.json``: the resolved :class:`~trainer.config.TrainConfig`
- ``feature_spec.json``: the feature spec, its version and the time reference ``t_ref_seconds``:
  the T_ref the weights use, read from the model's own buffer (a warm start keeps its checkpoint's
  anchor, whatever the new data's watermark), null for a model without time features
- ``_MANIFEST.json`` (sha256 of every file above) and ``_SUCCESS``, written last
  (:func:`features.dataset.write_manifest`)

The directory is assembled under a temporary name and renamed into place, then
``RUN_DIR/export/latest`` moves to it. ``latest`` is a relative symlink swapped atomically
(a new link under a temporary name, then ``os.replace``): a reader either sees the previous
export or the new complete one, and ``load_exported(RUN_DIR/export/latest)`` works as a plain path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from common.config import load_config, to_dict, to_yaml
from common.files import atomic_write_text, point_symlink, staged_directory, write_json
from features.dataset import IncompleteDatasetError, read_manifest, write_manifest
from features.spec import FEATURE_SPEC_VERSION, FeatureSpec
from trainer.config import TrainConfig
from trainer.model import GenerativeRanker

log = logging.getLogger(__name__)

EXPORTS = "export"
LATEST = "latest"
MODEL_FILE = "model.pt"
CONFIG_YAML = "config.yaml"
CONFIG_JSON = "config.json"
SPEC_FILE = "feature_spec.json"
EXPORT_FILES = (MODEL_FILE, CONFIG_YAML, CONFIG_JSON, SPEC_FILE)


class ExportError(RuntimeError):
    """An export directory that is incomplete, tampered with or corrupt."""


def export_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / EXPORTS


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_model(model: GenerativeRanker, config: TrainConfig, spec: FeatureSpec,
                 run_dir: str | Path, tag: str, step: int) -> Path:
    """Write ``RUN_DIR/export/<tag>/`` and point ``latest`` at it (call on one rank only).

    A complete export of the same tag is kept as it is (a resumed run that was already finished
    ends at the same weights), so ``latest`` never points at a directory being replaced.
    """
    root = export_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / tag
    if target.is_dir() and export_problem(target) is None:
        point_symlink(root / LATEST, tag)
        log.info("%s is already exported (latest -> %s)", target, tag)
        return target
    # A broken leftover of the same tag is replaced whole.
    with staged_directory(target) as staging:
        state = {name: tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point()
                                          else tensor.dtype).clone()
                 for name, tensor in model.state_dict().items()}
        torch.save(state, staging / MODEL_FILE)
        atomic_write_text(staging / CONFIG_YAML, to_yaml(config))
        write_json(staging / CONFIG_JSON, to_dict(config))
        write_json(staging / SPEC_FILE, {"spec": dataclasses.asdict(spec), "version": FEATURE_SPEC_VERSION,
                                         "t_ref_seconds": model.time_reference()})
        write_manifest(staging, {"tag": tag, "step": step,
                                 "sha256": {name: sha256(staging / name) for name in EXPORT_FILES}})
    point_symlink(root / LATEST, tag)
    log.info("exported %s (latest -> %s)", target, tag)
    return target


def verify_export(path: str | Path) -> dict[str, Any]:
    """The export's manifest, after checking it is complete and every checksum matches."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except IncompleteDatasetError as error:
        raise ExportError(f"{path} is not a complete export: {error}") from None
    for name in EXPORT_FILES:
        expected = manifest.get("sha256", {}).get(name)
        if expected is None or not (path / name).is_file():
            raise ExportError(f"{path} is incomplete: {name} is missing")
        if sha256(path / name) != expected:
            raise ExportError(f"{path / name} is corrupt: its sha256 does not match the manifest")
    return manifest


def export_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a valid export (:func:`verify_export`), or ``None`` when it is."""
    try:
        verify_export(path)
    except ExportError as error:
        return str(error)
    return None


def load_exported(path: str | Path) -> tuple[GenerativeRanker, TrainConfig, FeatureSpec]:
    """The exported model (eval mode, on CPU), its training config and feature spec.

    ``path`` is an export directory or ``RUN_DIR/export/latest``; the link is resolved once, so a
    concurrent publish cannot mix two exports. The model's T_ref comes from the weights, which must
    agree with ``feature_spec.json``. Raises :class:`ExportError` when incomplete, corrupt or when
    the two disagree.
    """
    path = Path(path).resolve()
    verify_export(path)
    config = load_config(TrainConfig, path / CONFIG_YAML)
    spec_record = json.loads((path / SPEC_FILE).read_text())
    spec = FeatureSpec(**spec_record["spec"])
    t_ref = spec_record["t_ref_seconds"]
    model = GenerativeRanker(config.model, spec, t_ref or 0)
    state = torch.load(path / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    if model.time_reference() != t_ref:
        raise ExportError(f"{path / SPEC_FILE} records T_ref {t_ref}, but the weights use "
                          f"{model.time_reference()}")
    model.eval()
    return model, config, spec
