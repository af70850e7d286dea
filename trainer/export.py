"""Export: a self-contained, checksummed model directory that serving and evaluation load safely.

``RUN_DIR/export/<tag>/`` holds

- ``model.pt``: the fp32 state dict (tensors only, loadable with ``weights_only=True``)
- ``config.yaml`` and ``config.json``: the resolved :class:`~trainer.config.TrainConfig`
- ``feature_spec.json``: the feature spec (:meth:`FeatureSpec.record`, the whole event schema
  included), its version, the schema's ``schema_fingerprint`` (equal schemas, equal fingerprints)
  and the time reference ``t_ref_seconds``: the T_ref the weights use, read from the model's own
  buffer (a warm start keeps its checkpoint's anchor, whatever the new data's watermark), null for
  a model without time features
- ``_MANIFEST.json`` (sha256 of every file above) and ``_SUCCESS``, written last
  (:func:`features.dataset.write_manifest`)

The directory is assembled under a temporary name and renamed into place, then
``RUN_DIR/export/latest`` moves to it. ``latest`` is a relative symlink swapped atomically
(a new link under a temporary name, then ``os.replace``): a reader either sees the previous
export or the new complete one, and ``load_exported(RUN_DIR/export/latest)`` works as a plain path.

**Deltas.** The registry (:mod:`lifecycle.registry`) may store a model as a *delta* on its parent,
the model published before it, a sibling directory. A delta directory holds the same files except
that ``model.delta.pt`` replaces ``model.pt``; it is ``torch.save`` of plain dicts of tensors::

    {"dense":  {key: tensor},                       every entry that is not an id table, whole
     "tables": {key: {"ids": int64 [n],              every id table (``id_embeddings.*``): the rows
                      "rows": table dtype [n, d]}}}  whose bytes differ from the parent's, and those rows

and its manifest adds ``"delta": {"parent": NAME, "parent_sha256": HEX, "changed_rows": {key: n}}``,
``parent_sha256`` being the parent's model file (``model.pt`` or ``model.delta.pt``) as its own
manifest records it. Reading one (:func:`load_state`) follows the parents to the full base, checks
every directory's checksums and every recorded parent sha256, loads the base and applies the deltas
oldest first, writing the rows bit for bit: the result is the state dict a full export of the same
weights loads. Only the registry writes deltas; run exports are always full.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from common.config import load_config, to_dict, to_yaml
from common.files import atomic_write_text, point_symlink, staged_directory, write_json
from features.dataset import IncompleteDatasetError, read_manifest, write_manifest
from features.schema import EventSchema, require_same_schema
from features.spec import FEATURE_SPEC_VERSION, FeatureSpec
from trainer.config import TrainConfig
from trainer.model import GenerativeRanker

log = logging.getLogger(__name__)

EXPORTS = "export"
LATEST = "latest"
MODEL_FILE = "model.pt"
DELTA_FILE = "model.delta.pt"
CONFIG_YAML = "config.yaml"
CONFIG_JSON = "config.json"
SPEC_FILE = "feature_spec.json"
EXPORT_FILES = (MODEL_FILE, CONFIG_YAML, CONFIG_JSON, SPEC_FILE)
DELTA_FILES = (DELTA_FILE, CONFIG_YAML, CONFIG_JSON, SPEC_FILE)
TABLE_PREFIX = "id_embeddings."
"""State-dict keys of the id tables: the entries a delta stores row by row."""
COMPARE_ROWS = 1 << 16
"""Rows compared at once when diffing a table, so a table of tens of millions of rows needs no
table-sized comparison mask."""

State = dict[str, torch.Tensor]


class ExportError(RuntimeError):
    """An export directory that is incomplete, tampered with or corrupt."""


class DeltaMismatch(ValueError):
    """Weights that cannot be a delta on the parent's: the keys or a table's shape or dtype differ."""


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
        # Not write_json: its sorted keys would scramble the schema's ordered mappings (fields,
        # tables, columns, tasks), whose order is the model's layout.
        atomic_write_text(staging / SPEC_FILE, json.dumps(
            {"spec": spec.record(), "version": FEATURE_SPEC_VERSION,
             "schema_fingerprint": spec.event_schema.fingerprint, "t_ref_seconds": model.time_reference()},
            indent=2) + "\n")
        write_manifest(staging, {"tag": tag, "step": step,
                                 "sha256": {name: sha256(staging / name) for name in EXPORT_FILES}})
    point_symlink(root / LATEST, tag)
    log.info("exported %s (latest -> %s)", target, tag)
    return target


def is_table(key: str) -> bool:
    """Whether a state-dict entry is an id table (stored row by row in a delta)."""
    return key.startswith(TABLE_PREFIX)


def verify_export(path: str | Path) -> dict[str, Any]:
    """The export's manifest, after checking it is complete and every checksum matches; for a delta,
    also every ancestor's, and that each parent is the one its child recorded."""
    return _chain(path)[0][1]


def export_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a valid export (:func:`verify_export`), or ``None`` when it is."""
    try:
        verify_export(path)
    except ExportError as error:
        return str(error)
    return None


def ancestry(path: str | Path) -> list[Path]:
    """``path`` and the ancestors its manifests name, newest first, as far as their manifests can be
    read. Nothing is verified: this is what a model needs kept, even when its chain is broken."""
    chain = [Path(path)]
    while True:
        try:
            record = read_manifest(chain[-1]).get("delta")
        except (OSError, ValueError):  # no marker (IncompleteDatasetError), unreadable or torn JSON
            return chain
        if record is None:
            return chain
        parent = chain[-1].parent / record["parent"]
        if parent in chain:
            return chain
        chain.append(parent)


def load_state(path: str | Path) -> State:
    """The export's full state dict, a delta's chain applied, after :func:`verify_export`'s checks."""
    return _state(_chain(path))


def write_delta(source: Path, parent: Path, staging: Path) -> dict[str, int]:
    """Write the verified full export ``source`` into the empty directory ``staging`` as a delta on
    the verified export ``parent``, which is ``staging``'s sibling (the registry's directory).

    Returns the number of changed rows per table. Raises :class:`DeltaMismatch`, having written
    nothing, when the state dict's keys, or a table's shape or dtype, differ from the parent's.
    """
    new = _load_tensors(source / MODEL_FILE)
    links = _chain(parent)
    old = _state(links)
    if set(new) != set(old):
        raise DeltaMismatch(f"the state dict's keys differ from {parent.name}'s")
    tables = [key for key in new if is_table(key)]
    for key in tables:
        if (new[key].shape, new[key].dtype) != (old[key].shape, old[key].dtype):
            raise DeltaMismatch(f"{key} is {new[key].dtype} {tuple(new[key].shape)}, "
                                f"{parent.name}'s {old[key].dtype} {tuple(old[key].shape)}")
    changed = {key: _changed_rows(new[key], old[key]) for key in tables}
    torch.save({"dense": {key: tensor for key, tensor in new.items() if not is_table(key)},
                "tables": {key: {"ids": ids, "rows": _bits(new[key])[ids].view(new[key].dtype)}
                           for key, ids in changed.items()}},
               staging / DELTA_FILE)
    for name in DELTA_FILES[1:]:
        shutil.copy2(source / name, staging / name)
    parent_manifest = links[0][1]
    record = {"parent": parent.name,
              "parent_sha256": parent_manifest["sha256"][_model_file(parent_manifest)],
              "changed_rows": {key: len(ids) for key, ids in changed.items()}}
    manifest = {key: value for key, value in read_manifest(source).items() if key != "sha256"}
    write_manifest(staging, {**manifest, "delta": record,
                             "sha256": {name: sha256(staging / name) for name in DELTA_FILES}})
    return record["changed_rows"]


def load_exported(path: str | Path, expected_schema: EventSchema | None = None
                  ) -> tuple[GenerativeRanker, TrainConfig, FeatureSpec]:
    """The exported model (eval mode, on CPU), its training config and feature spec.

    ``path`` is an export directory, a published model (a delta is read through its chain,
    :func:`load_state`) or a ``latest`` link; the link is resolved once, so a concurrent publish
    cannot mix two exports. The model's T_ref comes from the weights, which must agree with
    ``feature_spec.json``. Raises :class:`ExportError` when incomplete, corrupt (an ancestor of a
    delta included), of another feature spec version or when the two disagree; with
    ``expected_schema`` (the event schema of the data it is to score), ``SchemaError`` naming the
    differences when it was trained on another, before any weights are read.
    """
    path = Path(path).resolve()
    links = _chain(path)
    spec_record = json.loads((path / SPEC_FILE).read_text())
    if spec_record.get("version") != FEATURE_SPEC_VERSION:
        raise ExportError(f"{path} was exported under feature spec version {spec_record.get('version')!r}; "
                          f"this version reads {FEATURE_SPEC_VERSION!r} exports")
    spec = FeatureSpec(**spec_record["spec"])
    if expected_schema is not None:
        require_same_schema(expected_schema, spec.event_schema,
                            f"the export {path} (differences: the expected value vs the export's)")
    state = _state(links)
    config = load_config(TrainConfig, path / CONFIG_YAML)
    t_ref = spec_record["t_ref_seconds"]
    model = GenerativeRanker(config.model, spec, t_ref or 0)
    model.load_state_dict(state)
    if model.time_reference() != t_ref:
        raise ExportError(f"{path / SPEC_FILE} records T_ref {t_ref}, but the weights use "
                          f"{model.time_reference()}")
    model.eval()
    return model, config, spec


def _model_file(manifest: dict[str, Any]) -> str:
    return DELTA_FILE if "delta" in manifest else MODEL_FILE


def _verified_files(path: Path) -> dict[str, Any]:
    """One directory's manifest, after checking it is complete and its own files' checksums."""
    try:
        manifest = read_manifest(path)
    except IncompleteDatasetError as error:
        raise ExportError(f"{path} is not a complete export: {error}") from None
    for name in DELTA_FILES if "delta" in manifest else EXPORT_FILES:
        expected = manifest.get("sha256", {}).get(name)
        if expected is None or not (path / name).is_file():
            raise ExportError(f"{path} is incomplete: {name} is missing")
        if sha256(path / name) != expected:
            raise ExportError(f"{path / name} is corrupt: its sha256 does not match the manifest")
    return manifest


def _chain(path: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """``path`` (resolved) and its ancestors to the full base, newest first, each with its verified
    manifest; an ancestor that is missing, corrupt or not the parent its child recorded is named."""
    path = Path(path).resolve()
    links = [(path, _verified_files(path))]
    while "delta" in links[-1][1]:
        child, record = links[-1][0], links[-1][1]["delta"]
        name = record["parent"]
        if Path(name).name != name or name in ("", ".", ".."):
            raise ExportError(f"{child}'s manifest names {name!r} as its parent, which is not a sibling")
        parent = child.parent / name
        if any(parent == seen for seen, _ in links):
            raise ExportError(f"the chain of parents of {path} loops back to {parent}")
        if not parent.is_dir():
            raise ExportError(f"{path} cannot be read: its ancestor {parent} (the parent of {child.name}) "
                              "is missing")
        try:
            manifest = _verified_files(parent)
        except ExportError as error:
            raise ExportError(f"{path} cannot be read: its ancestor {parent} (the parent of {child.name}) "
                              f"is not a valid export: {error}") from None
        if manifest["sha256"][_model_file(manifest)] != record["parent_sha256"]:
            raise ExportError(f"{path} cannot be read: its ancestor {parent} is not the model "
                              f"{child.name} was published against (its sha256 differs from the one recorded)")
        links.append((parent, manifest))
    return links


def _state(links: list[tuple[Path, dict[str, Any]]]) -> State:
    """The base's state dict with the deltas of ``links`` (newest first, as :func:`_chain`) applied."""
    state = _load_tensors(links[-1][0] / MODEL_FILE)
    for directory, _ in reversed(links[:-1]):
        state = _apply_delta(state, _load_tensors(directory / DELTA_FILE), directory / DELTA_FILE)
    return state


def _load_tensors(file: Path) -> Any:
    # mmap: the tables stay file-backed (copy on write where a delta writes rows), so diffing two
    # models of tens of GB, or loading one into a model, does not hold them in memory twice.
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def _apply_delta(state: State, delta: dict[str, Any], file: Path) -> State:
    dense, tables = delta["dense"], delta["tables"]
    if set(tables) != {key for key in state if is_table(key)} or set(dense) != {key for key in state
                                                                                 if not is_table(key)}:
        raise ExportError(f"{file} does not hold the entries of its parent's state dict")
    for key, change in tables.items():
        table, ids, rows = state[key], change["ids"], change["rows"]
        if (ids.dtype != torch.int64 or ids.dim() != 1 or rows.dtype != table.dtype
                or rows.shape != (len(ids), *table.shape[1:])
                or (len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < len(table))):
            raise ExportError(f"{file}: the changed rows of {key} do not fit its parent's table "
                              f"{tuple(table.shape)}")
        _bits(table)[ids] = _bits(rows)
    return {key: dense.get(key, tensor) for key, tensor in state.items()}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """A floating tensor's bytes as integers of its element size (the same storage), so comparing
    and copying rows are bit-exact: -0.0 differs from 0.0, a NaN equals itself with its payload."""
    if not tensor.is_floating_point():
        return tensor
    return tensor.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def _changed_rows(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Ids (int64) of the rows of ``new`` whose bytes differ from ``old``'s (same shape and dtype)."""
    new_bits, old_bits = _bits(new).reshape(len(new), -1), _bits(old).reshape(len(old), -1)
    found = [torch.ne(new_bits[start:start + COMPARE_ROWS], old_bits[start:start + COMPARE_ROWS])
             .any(dim=1).nonzero().flatten() + start
             for start in range(0, len(new), COMPARE_ROWS)]
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.int64)
