"""``pancseg prepare``: turn the user's raw dataset into an nnU-Net v2 raw dataset.

The source is never modified: CTs are hard-linked (or copied), masks copied (small, and what
clean repairs: a link would let an in-place edit of the source mask change them unseen) and
converted to ``.nii.gz`` where needed. The dataset is built in a temporary folder and renamed into place, so an interrupted run
leaves nothing half-written. A record of the source (``pancseg_prepare.json``) makes re-runs
idempotent and lets a changed source be detected.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pancreas_cli.config import Config, DatasetConfig, project_overlap
from pancreas_cli.exceptions import DataError, OutputExistsError, PrepareError, SubtypeConflictError
from pancreas_cli.imageio import image_extension, image_stem, link_or_copy, read_image, write_image, write_text
from pancreas_cli.locks import project_stage, writing
from pancreas_cli.subtypes import (CASE_SUBTYPES_NAME, SUBTYPES, case_id, image_name, is_image, one_per_case,
                                   render_case_subtypes, subtype_cells, subtype_value)
from pancreas_cli.tables import read_table

Split = Literal["train", "validation", "test"]
RECORD_NAME = "pancseg_prepare.json"
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class SourceCase:
    """One case as found in the user's source."""

    case_id: str
    split: Split
    image: Path
    mask: Path | None = None
    subtype: int | None = None


@dataclass
class PrepareResult:
    dataset_dir: Path
    cases: list[SourceCase]
    up_to_date: bool = False
    converted: int = 0
    folds: int = 0
    official_split: bool = False
    notes: list[str] = field(default_factory=list)

    def count(self, split: Split) -> int:
        return sum(c.split == split for c in self.cases)

    @property
    def subtype_counts(self) -> dict[int, int]:
        counts = Counter(c.subtype for c in self.cases if c.split != "test" and c.subtype is not None)
        return {k: counts.get(k, 0) for k in SUBTYPES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset_dir": str(self.dataset_dir),
            "up_to_date": self.up_to_date,
            "train": self.count("train"),
            "validation": self.count("validation"),
            "test": self.count("test"),
            "subtypes": self.subtype_counts,
            "converted": self.converted,
            "folds": self.folds,
            "official_split": self.official_split,
            "notes": self.notes,
        }


# --------------------------------------------------------------------------------------------
# Discovering cases in the three layouts


def _parse_subtype(value: str, where: str) -> int:
    try:
        return subtype_value(value)
    except ValueError:
        raise PrepareError(f"{where}: unknown subtype {value!r}; subtypes must be 0, 1 or 2") from None


def _check_link(path: Path, where: str = "") -> None:
    """A source file behind a symbolic link that leads nowhere (git-annex, DataLad: content not
    fetched) is an error, not a file quietly left out."""
    if path.is_symlink() and not path.exists():
        raise PrepareError(f"{where}{path}: broken symbolic link (to {os.readlink(path)}); fetch its content "
                           "(e.g. `git annex get`, `datalad get`) or remove the link")


def _images_in(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.iterdir()):
        if image_extension(path) and not path.name.startswith("."):
            _check_link(path)
            if path.is_file():
                found.append(path)
    return found


def _quiz_cases(source: Path) -> list[SourceCase]:
    """``train|validation/subtypeK/quiz_K_NNN(_0000).nii.gz`` and ``test/quiz_NNN_0000.nii.gz``."""
    cases: list[SourceCase] = []
    for split in ("train", "validation"):
        split_dir = source / split
        if not split_dir.is_dir():
            continue
        stray = _images_in(split_dir)
        if stray:
            raise PrepareError(
                f"{stray[0]}: image outside a subtype folder; quiz layout expects "
                f"{split}/subtype0|subtype1|subtype2/<case>.nii.gz"
            )
        for sub_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            match = re.fullmatch(r"subtype(\d+)", sub_dir.name)
            if not match:
                raise PrepareError(f"{sub_dir}: unexpected folder; quiz layout expects subtype0, subtype1, subtype2")
            subtype = _parse_subtype(match.group(1), str(sub_dir))
            files = _images_in(sub_dir)
            stems = Counter(image_stem(p) for p in files)
            twice = sorted(s for s, n in stems.items() if n > 1)
            if twice:
                raise PrepareError(f"{sub_dir}: {twice[0]} exists in several formats; keep one file per case")
            images = {case_id(p.name): p for p in files if is_image(p.name)}
            masks = {image_stem(p): p for p in files if not is_image(p.name)}
            for case, mask in masks.items():
                if case not in images:
                    raise PrepareError(
                        f"{mask}: mask without image; expected {sub_dir / image_name(case)}"
                    )
                cases.append(SourceCase(case, split, images[case], mask, subtype))  # type: ignore[arg-type]
            for case, image in images.items():
                if case not in masks:
                    raise PrepareError(f"{image}: image without mask; expected {sub_dir / f'{case}.nii.gz'}")
    test_dir = source / "test"
    if test_dir.is_dir():
        cases += [SourceCase(case_id(p.name), "test", p) for p in _images_in(test_dir)]
    if not any(c.split != "test" for c in cases) and not (source / "train").is_dir():
        raise PrepareError(
            f"{source}: no train/ folder; the quiz layout is train|validation/subtypeK/<case>.nii.gz "
            f"with {image_name('<case>')} images (set dataset.layout for other layouts)"
        )
    return cases


def _read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line, row) of each row of ``path``, column names and cells stripped."""
    try:
        table = read_table(path)
    except (OSError, ValueError) as exc:
        raise PrepareError(f"{path}: cannot read CSV ({exc})") from exc
    missing = [c for c in required if c not in [h.strip() for h in table.header]]
    if missing:
        raise PrepareError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(required)}")
    return [(line, {k.strip(): v.strip() for k, v in row.items()}) for line, row in table.records()]


def _seed_cases(source: Path, subtypes_csv: Path) -> list[SourceCase]:
    """``imagesTr/img_NNN``, ``labelsTr/mask_NNN``, ``imagesTs/``; subtypes from a CSV."""
    images_dir, labels_dir = source / "imagesTr", source / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise PrepareError(f"{folder}: folder not found; the seed layout needs imagesTr/ and labelsTr/")
    subtypes = _subtype_rows(subtypes_csv)

    def mask_key(stem: str) -> str:
        return "img" + stem[4:] if stem.startswith("mask") else stem

    masks = {mask_key(image_stem(p)): p for p in _images_in(labels_dir)}
    cases: list[SourceCase] = []
    for image in _images_in(images_dir):
        case = case_id(image.name)
        mask = masks.pop(case, None)
        if mask is None:
            raise PrepareError(f"{image}: image without mask; expected {labels_dir}/mask{case[3:]}.nii.gz")
        rows = [subtypes[key] for key in (case, image_stem(mask)) if key in subtypes]
        if not rows:
            raise PrepareError(f"{subtypes_csv}: no subtype for case {case}; add a row '{case},<0|1|2>'")
        if len({value for value, _ in rows}) > 1:
            raise PrepareError(_conflict(subtypes_csv, case, *rows, f" (as {image_stem(mask)}); keep one"))
        cases.append(SourceCase(case, "train", image, mask, rows[0][0]))
    if masks:
        orphan = next(iter(masks.values()))
        raise PrepareError(f"{orphan}: mask without image in {images_dir}")
    if (source / "imagesTs").is_dir():
        cases += [SourceCase(case_id(p.name), "test", p) for p in _images_in(source / "imagesTs")]
    return cases


def _subtype_rows(path: Path) -> dict[str, tuple[int, int]]:
    """Case id -> (subtype, line) of the seed layout's subtype CSV, read and checked as every subtype CSV
    (:mod:`pancreas_cli.subtypes`): two rows that give a case two subtypes are an error."""
    try:
        rows = [(line, case, _parse_subtype(text.strip(), f"{path}, line {line}, case {case}"))
                for line, case, text in subtype_cells(path)]
        return one_per_case(path, rows)
    except SubtypeConflictError as exc:
        raise PrepareError(_conflict(path, exc.case, exc.first, exc.second, "; keep one row per case")) \
            from None
    except PrepareError:
        raise
    except DataError as exc:
        raise PrepareError(str(exc)) from exc


def _conflict(path: Path, case: str, first: tuple[int, int], second: tuple[int, int], fix: str) -> str:
    """Two rows that give ``case`` two subtypes: (subtype, line) each."""
    return (f"{path}: case {case} has subtype {first[0]} on line {first[1]} and {second[0]} on line "
            f"{second[1]}{fix}")


def _manifest_cases(manifest: Path) -> list[SourceCase]:
    """CSV ``case_id,image,mask,subtype,split``; relative paths are relative to the CSV. A case listed
    twice the same way passes; two different rows for a case are an error naming both lines."""
    cases: dict[str, tuple[SourceCase, int]] = {}
    for line, row in _read_csv(manifest, ("case_id", "image", "mask", "subtype", "split")):
        case = _manifest_case(manifest, line, row)
        first, first_line = cases.setdefault(case.case_id, (case, line))
        if first != case:
            differ = ", ".join(f"{key} {getattr(first, key)} vs {getattr(case, key)}"
                               for key in ("split", "subtype", "image", "mask")
                               if getattr(first, key) != getattr(case, key))
            raise PrepareError(f"{manifest}: case {case.case_id} is on line {first_line} and line {line} "
                               f"with different values ({differ}); keep one row per case")
    return [case for case, _ in cases.values()]


def _manifest_case(manifest: Path, line: int, row: dict[str, str]) -> SourceCase:
    where = f"{manifest}, line {line}"
    split = row["split"].lower()
    if split not in ("train", "validation", "test"):
        raise PrepareError(f"{where}: split must be train, validation or test, got {row['split']!r}")
    if not row["image"]:
        raise PrepareError(f"{where}: no image path")
    image = (manifest.parent / row["image"]).absolute()
    mask = (manifest.parent / row["mask"]).absolute() if row["mask"] else None
    for path in (image, mask):
        if path is not None:
            _check_link(path, f"{where}: ")
        if path is not None and not path.is_file():
            raise PrepareError(f"{where}: file not found: {path}")
        if path is not None and not image_extension(path):
            raise PrepareError(f"{where}: {path.name} is not a .nii.gz, .nii, .nrrd or .mha file")
    if split == "test":
        return SourceCase(row["case_id"], "test", image, mask, None)
    if mask is None:
        raise PrepareError(f"{where}: {split} case {row['case_id']} needs a mask")
    subtype = _parse_subtype(row["subtype"], where)
    return SourceCase(row["case_id"], split, image, mask, subtype)  # type: ignore[arg-type]


def discover_cases(dataset: DatasetConfig) -> list[SourceCase]:
    """Find every case of the configured layout and check ids, pairs and subtypes."""
    if dataset.layout == "manifest":
        assert dataset.manifest is not None  # guaranteed by config validation
        cases = _manifest_cases(dataset.manifest)
        where = dataset.manifest
    elif dataset.layout == "seed":
        assert dataset.subtypes_csv is not None  # guaranteed by config validation
        cases = _seed_cases(dataset.source, dataset.subtypes_csv)
        where = dataset.source
    else:
        cases = _quiz_cases(dataset.source)
        where = dataset.source
    if not cases:
        raise PrepareError(f"{where}: no cases found for layout '{dataset.layout}'")
    seen: dict[str, SourceCase] = {}
    for case in cases:
        if not _CASE_ID.match(case.case_id):
            raise PrepareError(
                f"{case.image}: case id {case.case_id!r} has characters nnU-Net cannot use; "
                "rename it to letters, digits, '_', '-' or '.'"
            )
        if case.case_id in seen:
            raise PrepareError(
                f"duplicate case id {case.case_id!r}: {seen[case.case_id].image} and {case.image}; case ids must be unique"
            )
        seen[case.case_id] = case
    labelled = sum(c.split != "test" for c in cases)
    if labelled < 2:
        raise PrepareError(f"{where}: at least 2 labelled (train/validation) cases are needed, found {labelled}")
    return cases


# --------------------------------------------------------------------------------------------
# Splits


def make_splits(cases: list[SourceCase], num_folds: int, seed: int) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json``.

    With validation cases, fold 0 is exactly the official train/validation split; the other folds
    are folds 1.. of a subtype-stratified k-fold over all labelled cases. Without them, all folds are
    stratified. Stratification shuffles each subtype with ``seed`` and deals it round robin.
    """
    import numpy as np

    labelled = sorted((c for c in cases if c.split != "test"), key=lambda c: c.case_id)
    k = min(num_folds, len(labelled))
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    offset = 0
    for subtype in SUBTYPES:
        ids = [c.case_id for c in labelled if c.subtype == subtype]
        for i, idx in enumerate(rng.permutation(len(ids))):
            fold_of[ids[idx]] = (i + offset) % k
        offset += len(ids)  # keeps fold sizes balanced across subtypes
    all_ids = [c.case_id for c in labelled]
    splits = [
        {"train": [i for i in all_ids if fold_of[i] != f], "val": [i for i in all_ids if fold_of[i] == f]}
        for f in range(k)
    ]
    validation = [c.case_id for c in labelled if c.split == "validation"]
    if validation:
        splits[0] = {"train": [c.case_id for c in labelled if c.split == "train"], "val": validation}
    return splits


# --------------------------------------------------------------------------------------------
# Building the nnU-Net dataset


def _file_record(path: Path) -> dict[str, Any]:
    """What identifies a source file as it is now: the file a symbolic link leads to, not the link."""
    stat = path.stat()
    record = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if path.is_symlink():
        record["target"] = str(path.resolve())
    return record


def _record(config: Config, cases: list[SourceCase]) -> dict[str, Any]:
    ds = config.dataset
    return {
        "format": 1,
        "layout": ds.layout,
        "source": str(ds.manifest if ds.layout == "manifest" else ds.source),
        "region_based": ds.region_based,
        "num_folds": ds.num_folds,
        "split_seed": ds.split_seed,
        "cases": [
            {
                "case_id": c.case_id,
                "split": c.split,
                "subtype": c.subtype,
                "image": _file_record(c.image),
                "mask": _file_record(c.mask) if c.mask else None,
            }
            for c in cases
        ],
    }


def _describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    old_cases = {c["case_id"]: c for c in old.get("cases", [])}
    new_cases = {c["case_id"]: c for c in new["cases"]}
    parts = []
    for key in ("layout", "source", "region_based", "num_folds", "split_seed"):
        if old.get(key) != new[key]:
            # The record's source is the manifest's path for a manifest layout: name the key that was set.
            name = "manifest" if key == "source" and new["layout"] == "manifest" else key
            parts.append(f"dataset.{name} {old.get(key)!r} -> {new[key]!r}")
    added, removed = new_cases.keys() - old_cases.keys(), old_cases.keys() - new_cases.keys()
    changed = [k for k in new_cases.keys() & old_cases.keys() if new_cases[k] != old_cases[k]]
    for label, ids in (("added", added), ("removed", removed), ("changed", changed)):
        if ids:
            parts.append(f"{len(ids)} case(s) {label} (e.g. {sorted(ids)[0]})")
    return "; ".join(parts) or "contents differ"


def dataset_json(config: Config, num_training: int) -> dict[str, Any]:
    """nnU-Net v2's ``dataset.json`` for labels or regions."""
    data: dict[str, Any] = {
        "name": config.dataset.name,
        "description": "Pancreas and lesion segmentation with lesion subtype (prepared by pancseg)",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "pancreas": 1, "lesion": 2},
        "numTraining": num_training,
        "file_ending": ".nii.gz",
    }
    if config.dataset.region_based:
        data["labels"] = {"background": 0, "pancreas": [1, 2], "lesion": 2}
        data["regions_class_order"] = [1, 2]
    return data


def _place(src: Path, dst: Path, *, copy: bool = False) -> bool:
    """Link (or ``copy``) ``.nii.gz`` sources, convert other formats. Returns True when converted.

    A symbolic link (git-annex, DataLad) is followed: a hard link to the link itself would be a
    relative link that leads nowhere from the dataset folder.
    """
    if image_extension(src) == ".nii.gz":
        link_or_copy(src.resolve(strict=True), dst, link=not copy)
        return False
    try:
        write_image(read_image(src, verify=True), dst)
    except DataError as exc:
        raise PrepareError(str(exc)) from exc
    return True


def _existing_datasets_with_id(raw_dir: Path, dataset_id: int) -> list[Path]:
    if not raw_dir.is_dir():
        return []
    return sorted(p for p in raw_dir.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())


def prepared_files(config: Config, cases: list[SourceCase]) -> dict[str, str]:
    """The text of the files prepare writes beside the images, by name. It depends only on the
    config and the cases, so a re-run can tell a damaged or edited file."""
    labelled = sorted((c for c in cases if c.split != "test"), key=lambda c: c.case_id)
    splits = make_splits(cases, config.dataset.num_folds, config.dataset.split_seed)
    return {
        "dataset.json": json.dumps(dataset_json(config, len(labelled)), indent=2),
        "splits_final.json": json.dumps(splits, indent=2),
        CASE_SUBTYPES_NAME: render_case_subtypes((c.case_id, c.subtype) for c in labelled),
    }


def _refuse_project_files(config: Config, cases: list[SourceCase]) -> None:
    """No source file may lie in the project, links followed (a manifest's paths, a link in the
    source): ``prepare --force`` deletes the dataset folder, clean replaces files there."""
    for case in cases:
        for path in (case.image, case.mask):
            if path is not None and (problem := project_overlap(path, config.written_folders)) is not None:
                raise PrepareError(f"{problem}; copy the data to a folder outside the project and prepare "
                                   "from there, or set project_dir to another folder")


@project_stage(creates=True)
def prepare(config: Config, *, force: bool = False) -> PrepareResult:
    """Build ``project_dir/nnUNet_raw/DatasetXXX_Name`` from the configured source."""
    cases = discover_cases(config.dataset)
    _refuse_project_files(config, cases)
    target = config.dataset_raw_dir
    record = _record(config, cases)
    files = prepared_files(config, cases)

    others = [p for p in _existing_datasets_with_id(config.raw_dir, config.dataset.id) if p != target]
    if others and not force:
        raise OutputExistsError(
            f"{others[0]} already uses dataset id {config.dataset.id}; choose another dataset.id "
            "or pass --force to replace it"
        )
    notes: list[str] = []
    if target.exists() and not force:
        old = _load_record(target)
        if old == record and _complete(target, cases):
            return _refresh(config, target, cases, files)
        if old != record:
            why = (_describe_difference(old, record) if old else f"its record {RECORD_NAME} is damaged"
                   if (target / RECORD_NAME).exists() else "it was not made by pancseg prepare")
            raise OutputExistsError(
                f"{target} exists and differs from the source ({why}); pass --force to rebuild it "
                "(cleaning will have to be re-run), or set changed dataset.* keys back to keep it"
            )
        # Same source, but prepared images are missing: rebuilding loses nothing of the user's.
        notes.append(f"{target} was incomplete and has been rebuilt; re-run `pancseg clean`")

    writing(config.project_dir)
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    converted = _build(tmp, cases, files, record)
    for other in others:
        shutil.rmtree(other)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    labelled, folds = sum(c.split != "test" for c in cases), len(json.loads(files["splits_final.json"]))
    if folds < config.dataset.num_folds:
        notes.append(f"{labelled} labelled cases: {folds} folds instead of dataset.num_folds = "
                     f"{config.dataset.num_folds}")
    return PrepareResult(target, cases, converted=converted, folds=folds,
                         official_split=any(c.split == "validation" for c in cases), notes=notes)


def _build(tmp: Path, cases: list[SourceCase], files: dict[str, str], record: dict[str, Any]) -> int:
    """Write the dataset into ``tmp``; returns the number of converted files."""
    converted = 0
    for case in cases:
        if case.split == "test":
            converted += _place(case.image, tmp / "imagesTs" / image_name(case.case_id))
            continue
        assert case.mask is not None  # discover_cases guarantees labelled cases have masks
        converted += _place(case.image, tmp / "imagesTr" / image_name(case.case_id))
        converted += _place(case.mask, tmp / "labelsTr" / f"{case.case_id}.nii.gz", copy=True)
    (tmp / "imagesTs").mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write_text(text, tmp / name)
    write_text(json.dumps(record, indent=2), tmp / RECORD_NAME)
    return converted


def _refresh(config: Config, target: Path, cases: list[SourceCase], files: dict[str, str]) -> PrepareResult:
    """The dataset is prepared from this very source: write again only the files prepare wrote that
    are missing or differ (truncated, edited), keeping the images and clean's fixes."""
    damaged = [name for name, text in files.items() if _read_text(target / name) != text]
    if damaged:
        writing(config.project_dir)
        for name in damaged:
            write_text(files[name], target / name)
    notes = [f"{', '.join(damaged)} in {target} differed from what prepare writes (damaged or edited): "
             "written again"] if damaged else []
    folds = len(json.loads(files["splits_final.json"]))
    return PrepareResult(target, cases, up_to_date=not damaged, folds=folds,
                         official_split=any(c.split == "validation" for c in cases), notes=notes)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _complete(dataset_dir: Path, cases: list[SourceCase]) -> bool:
    """Whether every image and mask a prepared dataset should hold is there (the other files:
    :func:`_refresh`)."""
    expected = []
    for c in cases:
        if c.split == "test":
            expected.append(dataset_dir / "imagesTs" / image_name(c.case_id))
        else:
            expected += [dataset_dir / "imagesTr" / image_name(c.case_id),
                         dataset_dir / "labelsTr" / f"{c.case_id}.nii.gz"]
    return all(p.is_file() for p in expected)


def _load_record(dataset_dir: Path) -> dict[str, Any] | None:
    path = dataset_dir / RECORD_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None
