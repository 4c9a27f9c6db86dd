"""``pancseg demo`` / ``pancseg run`` end to end with a reduced budget (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pancreas_cli.cli import app
from pancreas_cli.demo import DemoBudget, prepare_demo
from pancreas_cli.exceptions import OutputExistsError


@pytest.mark.slow
def test_demo_runs_everything_then_skips_what_is_done(runner: CliRunner, tmp_path: Path) -> None:
    args = ["demo", "--workdir", str(tmp_path / "demo"), "--cases", "8", "--epochs", "1", "--iterations", "2"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    for stage in ("[prepare]", "[clean]", "[preprocess]", "[train]", "[predict]", "[evaluate]", "[report]"):
        assert stage in first.stderr
    report = tmp_path / "demo" / "work" / "report" / "report_fold0.html"
    assert f"report: {report}" in first.stdout
    assert "the targets are the real data's" in first.stderr  # not a verdict on a minutes-long demo
    page = report.read_text()
    assert "id='overlays'" in page and page.count("data:image/png;base64,") == 4
    predictions = tmp_path / "demo" / "work" / "predictions" / "test"
    assert (predictions / "subtype_results.csv").read_text().startswith("Names,Subtype\n")
    summary = json.loads((predictions / "metrics_summary.json").read_text())
    assert summary["cases"] == 2 and summary["classification"]["cases"] == 2  # test cases with ground truth

    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "[prepare] up to date" in second.stderr and "[preprocess] up to date" in second.stderr
    assert "[train] fold 0 up to date" in second.stderr and "0 predicted, 2 up to date" in second.stderr


def test_demo_refuses_other_settings_in_the_same_folder(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "pancseg.yaml").write_text("project_dir: ./elsewhere\n")
    result = runner.invoke(app, ["demo", "--workdir", str(tmp_path)])
    assert result.exit_code == 1 and "exists with other settings" in result.stderr


def test_demo_refuses_a_workdir_synthesized_with_another_case_count(tmp_path: Path) -> None:
    prepare_demo(tmp_path, DemoBudget(cases=3, epochs=1, iterations=1))
    with pytest.raises(OutputExistsError, match=r"data holds 3 synthetic cases, not 4"):
        prepare_demo(tmp_path, DemoBudget(cases=4, epochs=1, iterations=1))
    assert len(list((tmp_path / "data").rglob("*_0000.nii.gz"))) == 3
    # A config written by another pancseg version differs in its comments only: still this demo.
    config = tmp_path / "pancseg.yaml"
    config.write_text(config.read_text().replace("# Written by", "# Made by"))
    prepare_demo(tmp_path, DemoBudget(cases=3, epochs=1, iterations=1))
