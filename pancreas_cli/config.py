"""The pancseg configuration: pydantic models, layering and friendly validation errors.

Layering: defaults < YAML file < ``--set a.b=c`` overrides < explicit command-line flags.
Relative paths resolve against the config file's folder (the working directory without one).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pancreas_cli.exceptions import ConfigError, OverrideSyntaxError
from pancreas_cli.inference.backends import BACKENDS
from pancreas_cli.multitask.settings import TrainingSettings
from pancreas_cli.layout import PREPROCESSED_DIR, RAW_DIR, RESULTS_DIR

CONFIG_TEMPLATE = Path(__file__).with_name("config_template.yaml")


class _Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are re-validated on assignment.

    Defaults are validated too, so default paths are resolved like given ones and absent sections
    (``{}``) are built with the same validation context.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    """Resolve a relative path against the config file's folder (passed in the validation context)."""
    if value is None:
        return None
    value = value.expanduser()
    base = (info.context or {}).get("base_dir")
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return Path(os.path.abspath(value))  # also drops "..": paths in messages read as the user thinks of them


class DatasetConfig(_Section):
    id: int = Field(1, ge=1, le=999, description="nnU-Net dataset id (DatasetXXX)")
    name: str = Field("PancreasCancer", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    source: Path = Path("./data")
    layout: Literal["quiz", "seed", "manifest"] = "quiz"
    subtypes_csv: Path | None = None
    manifest: Path | None = None
    region_based: bool = True  # regions: see config_template.yaml and README's subtype section
    split_seed: int = 12345
    num_folds: int = Field(5, ge=2, le=10)
    test_labels: Path | None = None
    test_subtypes_csv: Path | None = None

    _resolve_paths = field_validator("source", "subtypes_csv", "manifest", "test_labels", "test_subtypes_csv")(_resolve)

    @model_validator(mode="after")
    def _layout_inputs(self, info: ValidationInfo) -> DatasetConfig:
        if not (info.context or {}).get("check_source", True):
            return self  # stages after prepare never read the source
        if self.layout == "manifest":
            if self.manifest is None:
                raise ValueError("dataset.manifest: layout 'manifest' needs a CSV case_id,image,mask,subtype,split")
            if not self.manifest.is_file():
                raise ValueError(f"dataset.manifest: file not found: {self.manifest}")
        elif not self.source.is_dir():
            raise ValueError(f"dataset.source: folder not found: {self.source}")
        if self.layout == "seed":
            if self.subtypes_csv is None:
                raise ValueError("dataset.subtypes_csv: layout 'seed' needs a CSV case_id,subtype")
            if not self.subtypes_csv.is_file():
                raise ValueError(f"dataset.subtypes_csv: file not found: {self.subtypes_csv}")
        # `pancseg run` reads these only after hours of training: a wrong path should stop it first.
        if self.test_labels is not None and not self.test_labels.is_dir():
            raise ValueError(f"dataset.test_labels: folder not found: {self.test_labels}")
        if self.test_subtypes_csv is not None and not self.test_subtypes_csv.is_file():
            raise ValueError(f"dataset.test_subtypes_csv: file not found: {self.test_subtypes_csv}")
        return self

    @property
    def folder_name(self) -> str:
        """nnU-Net's folder name, e.g. ``Dataset001_PancreasCancer``."""
        return f"Dataset{self.id:03d}_{self.name}"

    def inputs(self) -> dict[str, Path]:
        """The configured paths pancseg reads the user's data from, by key (the source only where the
        layout reads it)."""
        found = {"source": self.source} if self.layout != "manifest" else {}
        keys = ("manifest", "subtypes_csv", "test_labels", "test_subtypes_csv")
        return found | {key: path for key in keys if (path := getattr(self, key)) is not None}


def project_overlap(path: Path, folders: list[Path]) -> str | None:
    """How ``path`` lies in one of ``folders`` (:attr:`Config.written_folders`), links followed on both
    sides (a ``project_dir/nnUNet_raw`` may be a link to an older nnU-Net folder); None when apart.

    Only a source equal to or inside such a folder is at risk: those are replaced or deleted whole.
    A project inside the source folder (``source: .``) only adds pancseg's own files next to it.
    """
    real = path.resolve()
    for folder in folders:
        target = folder.resolve()
        if real == target:
            return f"{path} is {folder}, which pancseg replaces (prepare --force, preprocess, train --force)"
        if real.is_relative_to(target):
            return f"{path} is inside {folder}, which pancseg replaces (prepare --force, preprocess, train --force)"
    return None


def kept_labels(label_map: dict[int, int]) -> dict[int, int]:
    """Source value -> label for a ``label_map`` setting (clean's and evaluate's): a map lists every
    value to keep (a multi-organ mask has its own 1 and 2); without one the values are 0, 1, 2."""
    return {0: 0, **label_map} if label_map else {0: 0, 1: 1, 2: 2}


def _targets_are_labels(value: dict[int, int]) -> dict[int, int]:
    bad = sorted({v for v in value.values() if v not in (0, 1, 2)})
    if bad:
        raise ValueError(f"targets must be 0, 1 or 2, got {bad}")
    return value


class CleanConfig(_Section):
    label_tolerance: float = Field(1e-3, gt=0, lt=0.5)
    label_map: dict[int, int] = Field(default_factory=dict)
    unknown_labels: Literal["error", "background"] = "error"
    spacing_tolerance: float = Field(1e-3, ge=0)
    origin_tolerance_mm: float = Field(1e-2, ge=0)
    direction_tolerance: float = Field(1e-3, ge=0)
    hu_range: tuple[float, float] = (-3100.0, 16000.0)

    _label_map = field_validator("label_map")(_targets_are_labels)


class PlanConfig(_Section):
    preset: Literal["default", "smoke"] = "default"
    planner: str = "nnUNetPlannerResEncM"
    num_processes: int = Field(2, ge=1, le=64)

    @property
    def configuration(self) -> str:
        """The nnU-Net configuration that the preset trains."""
        return "3d_smoke" if self.preset == "smoke" else "3d_fullres"


class WandbConfig(_Section):
    enabled: bool = False
    project: str = "pancseg"
    mode: Literal["online", "offline"] = "online"


class TrainConfig(_Section, TrainingSettings):
    """The training settings (defaults and bounds: :class:`TrainingSettings`) and how the run goes."""

    model_config = ConfigDict(frozen=False)  # a config is changed by --set and flags; handed settings are not

    task: Literal["multitask", "segmentation"] = "multitask"
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    num_gpus: int = Field(1, ge=1)
    da_workers: int | None = Field(None, ge=0, le=64)
    compile: bool = False
    wandb: WandbConfig = Field(default_factory=dict)  # type: ignore[arg-type]


class PredictConfig(_Section):
    checkpoint: Literal["best", "final"] = "best"
    folds: list[int] | None = None  # None: every finished fold (an ensemble)
    tile_step_size: float = Field(0.5, gt=0, le=1)
    mirroring: bool = True
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    engine: Literal["pancseg", "nnunet"] = "pancseg"
    batch_size: int | Literal["auto"] = "auto"
    region: bool = True
    region_margin_mm: float = Field(15.0, ge=0)
    compile: bool = False
    backend: Literal[tuple(BACKENDS)] = "torch"  # type: ignore[valid-type]  # the runtimes' names: one owner

    @model_validator(mode="after")
    def _backend_of_pancseg_engine(self) -> PredictConfig:
        if self.backend != "torch" and self.engine != "pancseg":
            raise ValueError(f"predict.backend: {self.backend} runs pancseg's engine; set predict.engine: pancseg, "
                             "or predict.backend: torch")
        return self

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be >= 1 or auto")
        return value


class TargetsConfig(_Section):
    dice_pancreas: float = Field(0.91, ge=0, le=1)
    dice_lesion: float = Field(0.31, ge=0, le=1)
    macro_f1: float = Field(0.70, ge=0, le=1)


class EvaluateConfig(_Section):
    nsd_tolerance_pancreas_mm: float = Field(5.0, gt=0)
    nsd_tolerance_lesion_mm: float = Field(2.0, gt=0)
    nsd_definition: Literal["border_voxel", "surface_area"] = "border_voxel"
    bootstrap: int = Field(1000, ge=0)
    num_workers: int = Field(2, ge=1, le=64)
    label_map: dict[int, int] = Field(default_factory=dict)
    unknown_labels: Literal["error", "background"] = "error"
    targets: TargetsConfig = Field(default_factory=dict)  # type: ignore[arg-type]

    _label_map = field_validator("label_map")(_targets_are_labels)


class LocksConfig(_Section):
    """What a command does when another holds the project, fold or output folder it needs."""

    wait: bool = False  # False: fail at once ("busy"); True: wait for the holder (--wait)
    wait_seconds: float | None = Field(None, gt=0)  # None: as long as it takes


class Config(_Section):
    project_dir: Path = Path("./pancseg_work")
    dataset: DatasetConfig = Field(default_factory=dict)  # type: ignore[arg-type]
    clean: CleanConfig = Field(default_factory=dict)  # type: ignore[arg-type]
    plan: PlanConfig = Field(default_factory=dict)  # type: ignore[arg-type]
    train: TrainConfig = Field(default_factory=dict)  # type: ignore[arg-type]
    predict: PredictConfig = Field(default_factory=dict)  # type: ignore[arg-type]
    evaluate: EvaluateConfig = Field(default_factory=dict)  # type: ignore[arg-type]
    locks: LocksConfig = Field(default_factory=dict)  # type: ignore[arg-type]

    _resolve_paths = field_validator("project_dir")(_resolve)

    @model_validator(mode="after")
    def _inputs_apart_from_project(self, info: ValidationInfo) -> Config:
        """A source in the project would be deleted by ``prepare --force`` (an older nnU-Net layout:
        source ``project_dir/nnUNet_raw/Dataset001_X``); a project in the source writes into it."""
        if not (info.context or {}).get("check_source", True):
            return self  # stages after prepare never read the source
        for key, path in self.dataset.inputs().items():
            if (problem := project_overlap(path, self.written_folders)) is None:
                continue
            raise ValueError(f"dataset.{key}: {problem}; copy the data to a folder outside it and point this "
                             "setting there, or set project_dir to another folder")
        return self

    _config_path: Path | None = PrivateAttr(None)

    @property
    def config_path(self) -> Path | None:
        """The YAML file this configuration was loaded from, if any."""
        return self._config_path

    @property
    def raw_dir(self) -> Path:
        return self.project_dir / RAW_DIR

    @property
    def preprocessed_dir(self) -> Path:
        return self.project_dir / PREPROCESSED_DIR

    @property
    def results_dir(self) -> Path:
        return self.project_dir / RESULTS_DIR

    @property
    def written_folders(self) -> list[Path]:
        """The folders pancseg replaces or deletes in whole or in part (``prepare --force`` the raw dataset,
        ``preprocess`` and ``train --force`` theirs); any of them may be a link elsewhere."""
        return [self.raw_dir, self.preprocessed_dir, self.results_dir, self.dataset_raw_dir,
                self.dataset_preprocessed_dir]

    @property
    def dataset_raw_dir(self) -> Path:
        return self.raw_dir / self.dataset.folder_name

    @property
    def dataset_preprocessed_dir(self) -> Path:
        return self.preprocessed_dir / self.dataset.folder_name


# --------------------------------------------------------------------------------------------
# Loading and layering

#: Values a config may stand for with its aliases expanded (the whole template has about 150).
MAX_YAML_VALUES = 10_000


class _BoundedLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing aliases that expand beyond :data:`MAX_YAML_VALUES` values.

    Loading shares an alias's value, but validation and its messages walk every copy: a 419-byte
    file of nested aliases (``[&a0 [...], &a1 [*a0, *a0, ...], ...]``) stood for 9^9 values and hung
    every command. The size is counted on the composed nodes, each once, before anything is built.
    """

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _expanded_size(node, {}, set())
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values ``node`` stands for, aliases expanded (``sizes``: per node, counted once)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise yaml.composer.ComposerError(None, None, "an alias (*name) refers to a value that contains it",
                                          node.start_mark)
    open_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = node.value if isinstance(node, yaml.SequenceNode) else []
    total = 1 + sum(_expanded_size(child, sizes, open_nodes) for child in children)
    open_nodes.discard(id(node))
    if total > MAX_YAML_VALUES:
        raise yaml.composer.ComposerError(
            None, None, f"its aliases (*name) expand to more than {MAX_YAML_VALUES} values (an alias bomb?); "
            "write the values out", node.start_mark)
    sizes[id(node)] = total
    return total


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], c); the value is parsed as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise OverrideSyntaxError([f"--set {text!r}: expected dotted.key=value, e.g. train.epochs=50"])
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise OverrideSyntaxError([f"--set {text!r}: value is not valid YAML ({exc.problem})"]) from exc
    return key.split("."), value


def _set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([f"config file not found: {path} (create one with `pancseg init {path}`)"])
    try:
        data = _load_yaml(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ConfigError(["not valid YAML: nested too deeply"], str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"not valid YAML{where}: {getattr(exc, 'problem', exc)}"], str(path)) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(["the file must hold a mapping of keys (project_dir:, dataset:, ...)"], str(path))
    return data


def load_config(
    path: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    flags: dict[str, Any] | None = None,
    *,
    check_source: bool = True,
) -> Config:
    """Load, layer and validate the configuration.

    ``flags`` maps dotted keys to values from explicit command-line options; ``None`` values are
    ignored so that an option the user did not give does not override the file. ``check_source``
    checks that the dataset's source files exist (only ``prepare`` and ``doctor`` need them).
    """
    data: dict[str, Any] = _read_yaml(path) if path is not None else {}
    given: dict[str, str] = {}  # dotted key -> where on the command line it was given
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(data, keys, value)
        given[".".join(keys)] = f"--set {text}"
    for dotted, value in (flags or {}).items():
        if value is not None:
            _set_dotted(data, dotted.split("."), value)
            given[dotted] = "a command-line option"
    base_dir = path.absolute().parent if path is not None else Path.cwd()
    try:
        config = Config.model_validate(data, context={"base_dir": base_dir, "check_source": check_source})
    except ValidationError as exc:
        problems = [_attribute(line, given) for line in format_validation_error(exc)]
        source = str(path) if path else None
        if given and path is not None:
            source = f"{path} with the command line's settings"
        raise ConfigError(problems, source) from exc
    config._config_path = path.absolute() if path is not None else None
    return config


def _attribute(problem: str, given: dict[str, str]) -> str:
    """Say when a bad value came from the command line rather than the file."""
    field = problem.split(":", 1)[0]
    origin = next((how for key, how in given.items() if field == key or field.startswith(f"{key}.")), None)
    return f"{problem} (from {origin})" if origin else problem


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section that holds ``loc``'s last key."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _union_member(part: Any) -> bool:
    """Whether a location part names a member of a union type (``list[float]``), not a key."""
    return isinstance(part, str) and ("[" in part or part in ("int", "float", "str", "bool", "none"))


_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}


def _message(err: Any) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return f"must be {op} {ctx[key]}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}, got {err['input']!r}"
    if kind == "string_pattern_mismatch":
        return f"invalid value {err['input']!r}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    msg = err["msg"][0].lower() + err["msg"][1:]
    if "input" in err and kind != "missing" and not isinstance(err["input"], dict):
        msg += f", got {err['input']!r}"
    return msg


def format_validation_error(exc: ValidationError) -> list[str]:
    """One ``dotted.path: message`` line per problem, in words a user can act on.

    A value that fits no member of a union (``class_weights: foo``) gets one error per member from
    pydantic; those become one line. Where the value has a member's shape (a list with a bad item),
    only that member's errors are shown.
    """
    lines: list[str] = []
    unions: dict[tuple[Any, ...], list[tuple[str, tuple[Any, ...], Any]]] = {}
    order: list[tuple[Any, ...]] = []  # locations of plain errors and union fields, as they come
    plain: dict[tuple[Any, ...], Any] = {}
    for err in exc.errors():
        loc = tuple(err["loc"])
        member = next((i for i, part in enumerate(loc) if _union_member(part)), None)
        if member is None:
            plain[loc] = err
            order.append(loc)
            continue
        if loc[:member] not in unions:
            unions[loc[:member]] = []
            order.append(loc[:member])
        unions[loc[:member]].append((str(loc[member]), loc[member + 1:], err))
    for loc in order:
        if loc in plain:
            lines.append(_line(loc, plain[loc]))
            continue
        inner = [(rest, err) for _, rest, err in unions[loc] if rest]
        if inner:
            lines.extend(_line(loc + rest, err) for rest, err in inner)
            continue
        expected = [f"one of {err['ctx']['expected']}" if err["type"] == "literal_error" else member
                    for member, _, err in unions[loc]]
        got = unions[loc][0][2]["input"]
        lines.append(f"{'.'.join(map(str, loc))}: must be {', or '.join(expected)}, got {got!r}")
    return lines


def _line(loc: tuple[Any, ...], err: Any) -> str:
    path = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _known_keys(loc), n=1)
        msg = f"unknown key (did you mean '{close[0]}'?)" if close else "unknown key"
    else:
        msg = _message(err)
        if err["type"] == "value_error" and re.match(r"^[a-z_]+(\.[a-z_]+)+: ", msg):
            return msg  # model-level checks name their own field
    return f"{path}: {msg}" if path else msg


def dump_config(config: Config) -> str:
    """The effective configuration as YAML (for provenance and ``--json`` output)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
