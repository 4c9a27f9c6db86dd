"""Config loading, layering, path resolution and error messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import write_config
from pancreas_cli.config import CONFIG_TEMPLATE, load_config, parse_override
from pancreas_cli.exceptions import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    return tmp_path


def problems(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides or [])
    return info.value.problems


def test_example_config_is_the_template_and_validates(project: Path) -> None:
    assert (ROOT / "example_config.yaml").read_text() == CONFIG_TEMPLATE.read_text()
    cfg_path = project / "example_config.yaml"
    shutil.copy(ROOT / "example_config.yaml", cfg_path)
    config = load_config(cfg_path)
    assert config.dataset.id == 1 and config.dataset.layout == "quiz"
    assert config.train.epochs == 1000 and config.train.iterations_per_epoch == 250
    assert config.plan.preset == "default" and config.dataset.region_based is True


def test_example_config_documents_every_key() -> None:
    text = (ROOT / "example_config.yaml").read_text()
    from pancreas_cli.config import Config

    for section, field in Config.model_fields.items():
        assert f"{section}:" in text, section
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            for key in annotation.model_fields:
                assert f"  {key}:" in text, f"{section}.{key} is not documented in example_config.yaml"


def test_relative_paths_resolve_against_the_config_folder(project: Path, in_dir: Path) -> None:
    sub = project / "configs"
    sub.mkdir()
    (sub / "raw").mkdir()
    path = write_config(sub, "project_dir: ../work\ndataset:\n  source: ./raw\n")
    config = load_config(path)
    assert config.project_dir == project / "work"  # normalised: messages show no "configs/../"
    assert config.dataset.source == sub / "raw"
    assert config.raw_dir == config.project_dir / "nnUNet_raw"
    assert config.dataset_raw_dir.name == "Dataset001_PancreasCancer"


def test_layering_defaults_file_set_flags(project: Path) -> None:
    path = write_config(project, "train:\n  epochs: 50\n  iterations_per_epoch: 10\n")
    assert load_config(path).train.epochs == 50
    config = load_config(path, ["train.epochs=7", "train.device=cpu"])
    assert config.train.epochs == 7 and config.train.device == "cpu"
    assert config.train.iterations_per_epoch == 10  # untouched keys keep the file's value
    flagged = load_config(path, ["train.epochs=7"], {"train.epochs": 3, "train.device": None})
    assert flagged.train.epochs == 3  # explicit flags win; None means "not given"
    assert flagged.train.device == "auto"


def test_set_parses_yaml_scalars_and_lists(project: Path) -> None:
    path = write_config(project, "")
    config = load_config(path, ["dataset.region_based=false", "clean.hu_range=[-1000, 3000]", "dataset.id=12"])
    assert config.dataset.region_based is False
    assert config.clean.hu_range == (-1000.0, 3000.0)
    assert config.dataset.folder_name == "Dataset012_PancreasCancer"
    assert parse_override("clean.label_map={7: 1}") == (["clean", "label_map"], {7: 1})


@pytest.mark.parametrize("bad", ["train.epochs", "=3", "train..epochs=3", "a.b=[unclosed"])
def test_malformed_set_is_an_error(project: Path, bad: str) -> None:
    lines = problems(write_config(project, ""), [bad])
    assert len(lines) == 1 and "--set" in lines[0]


def test_typo_key_names_its_dotted_path_and_suggests(project: Path) -> None:
    lines = problems(write_config(project, "train:\n  epocs: 5\n"))
    assert lines == ["train.epocs: unknown key (did you mean 'epochs'?)"]


def test_one_line_per_bad_field(project: Path) -> None:
    text = "dataset:\n  id: 1000\n  layout: zip\ntrain:\n  epochs: 0\n  device: gpu\nbogus: 1\n"
    lines = problems(write_config(project, text))
    assert "dataset.id: must be <= 999" in lines
    assert any(line.startswith("dataset.layout: must be one of") and "'zip'" in line for line in lines)
    assert "train.epochs: must be > 0" in lines
    assert any(line.startswith("train.device: invalid value 'gpu'") for line in lines)
    assert "bogus: unknown key" in lines
    assert len(lines) == 5


def test_wrong_type(project: Path) -> None:
    lines = problems(write_config(project, "train:\n  epochs: many\n"))
    assert len(lines) == 1 and lines[0].startswith("train.epochs: ") and "'many'" in lines[0]


def test_union_field_gets_one_line(project: Path) -> None:
    """class_weights is a word or a list: a value that is neither is one problem, not one per type."""
    lines = problems(write_config(project, "train:\n  class_weights: foo\n"))
    assert lines == ["train.class_weights: must be one of 'inverse_frequency' or 'none', or list[float], got 'foo'"]
    lines = problems(write_config(project, "train:\n  class_weights: [1, x, 2]\n"))
    assert len(lines) == 1 and lines[0].startswith("train.class_weights.1: input should be a valid number")


@pytest.mark.parametrize("weights", ["[1, 0, 1]", "[1, -1, 1]", "[1, 2]"])
def test_class_weights_must_be_three_positive_numbers(project: Path, weights: str) -> None:
    # A zero weight would make the subtype loss 0/0 on batches of that subtype alone.
    lines = problems(write_config(project, f"train:\n  class_weights: {weights}\n"))
    assert lines == ["train.class_weights: must be inverse_frequency, none, or three positive numbers (subtypes 0, 1, 2)"]


def test_missing_source_folder(tmp_path: Path) -> None:
    lines = problems(write_config(tmp_path, "dataset:\n  source: ./nowhere\n"))
    assert lines == [f"dataset.source: folder not found: {tmp_path / 'nowhere'}"]


def test_layout_requirements(project: Path) -> None:
    assert problems(write_config(project, "dataset:\n  layout: seed\n"))[0].startswith("dataset.subtypes_csv:")
    assert problems(write_config(project, "dataset:\n  layout: manifest\n"))[0].startswith("dataset.manifest:")
    lines = problems(write_config(project, "dataset:\n  layout: manifest\n  manifest: m.csv\n"))
    assert lines == [f"dataset.manifest: file not found: {project / 'm.csv'}"]


def test_test_labels_are_checked_before_run_trains(project: Path) -> None:
    lines = problems(write_config(project, "dataset:\n  test_labels: ./gt\n  test_subtypes_csv: ./gt.csv\n"))
    assert lines == [f"dataset.test_labels: folder not found: {project / 'gt'}"]
    (project / "gt").mkdir()
    lines = problems(write_config(project, "dataset:\n  test_labels: ./gt\n  test_subtypes_csv: ./gt.csv\n"))
    assert lines == [f"dataset.test_subtypes_csv: file not found: {project / 'gt.csv'}"]


def test_label_map_targets_must_be_labels(project: Path) -> None:
    lines = problems(write_config(project, "clean:\n  label_map: {7: 4}\n"))
    assert lines == ["clean.label_map: targets must be 0, 1 or 2, got [4]"]


def test_not_yaml_or_not_a_mapping(project: Path) -> None:
    assert "not valid YAML at line 2" in problems(write_config(project, "a: 1\n b: [\n"))[0]
    assert "mapping" in problems(write_config(project, "- 1\n- 2\n"))[0]


def test_missing_file(tmp_path: Path) -> None:
    lines = problems(tmp_path / "nope.yaml")
    assert "config file not found" in lines[0] and "pancseg init" in lines[0]


def test_dataset_name_must_be_nnunet_safe(project: Path) -> None:
    lines = problems(write_config(project, "dataset:\n  name: 'my data'\n"))
    assert lines[0].startswith("dataset.name: invalid value")


def test_smoke_preset_trains_the_smoke_configuration(project: Path) -> None:
    assert load_config(write_config(project, "plan: {preset: smoke}\n")).plan.configuration == "3d_smoke"
    assert load_config(write_config(project, "")).plan.configuration == "3d_fullres"
