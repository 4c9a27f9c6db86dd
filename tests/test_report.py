"""``pancseg report``: every section, embedded figures, and a headless-Chromium check when available."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pancreas_cli.cli import app

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def rendered(trained_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runner = CliRunner()
    cfg = str(trained_project / "pancseg.yaml")
    work = tmp_path_factory.mktemp("report")
    data = trained_project / "data"
    assert runner.invoke(app, ["predict", "-c", cfg, "-i", str(data / "test"), "-o", str(work / "pred"),
                               "--fold", "4"]).exit_code == 0
    assert runner.invoke(app, ["evaluate", "-c", cfg, "--pred", str(work / "pred"), "--gt",
                               str(data / "test_ground_truth"), "--subtypes",
                               str(data / "test_ground_truth" / "subtypes.csv")]).exit_code == 0
    result = runner.invoke(app, ["report", "-c", cfg, "--fold", "4", "-o", str(work / "report.html"), "--pred",
                                 str(work / "pred"), "--gt", str(data / "test_ground_truth"), "--images",
                                 str(data / "test")])
    assert result.exit_code == 0, result.output
    assert "dice_pancreas:" in result.stdout and "report:" in result.stdout
    return work / "report.html"


def test_every_section_with_embedded_figures(rendered: Path) -> None:
    page = rendered.read_text()
    for section in ("id='training'", "id='evaluation'", "id='overlays'", "id='provenance'"):
        assert section in page
    assert page.count("data:image/png;base64,") == 4  # curves, distributions, confusion, overlays
    assert "src=\"http" not in page and "href=\"http" not in page  # opens offline
    for text in ("macro_f1", "dice_pancreas", "nnunetv2", "torch", "training device", "project_dir"):
        assert text in page
    for png in ("training", "distributions", "confusion", "overlays"):
        assert (rendered.parent / f"report_{png}.png").stat().st_size > 5000


def test_missing_inputs_say_what_to_run(trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", "-c", str(trained_project / "pancseg.yaml"), "--fold", "3", "-o",
                                 str(tmp_path / "r.html")])
    assert result.exit_code == 0
    page = (tmp_path / "r.html").read_text()
    assert "pancseg train --fold 3" in page and "pancseg evaluate" in page
    assert "no training metrics for fold 3" in result.stderr
    bad = runner.invoke(app, ["report", "-c", str(trained_project / "pancseg.yaml"), "--pred", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "--pred folder not found" in bad.stderr
    again = runner.invoke(app, ["report", "-c", str(trained_project / "pancseg.yaml"), "--fold", "3", "-o",
                                str(tmp_path / "r.html"), "--json"])
    assert again.exit_code == 0, again.output  # a report is replaced by the next one
    data = json.loads(again.stdout)
    assert data["html"] == str(tmp_path / "r.html") and any("no training metrics" in n for n in data["notes"])
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_evaluation_from_a_metrics_folder(rendered: Path, runner: CliRunner, trained_project: Path,
                                         tmp_path: Path) -> None:
    """`pancseg evaluate -o DIR` writes the metrics away from the predictions: --metrics DIR finds them."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    for name in ("metrics_summary.json", "metrics_per_case.csv"):
        shutil.copy(rendered.parent / "pred" / name, metrics / name)
    cfg = str(trained_project / "pancseg.yaml")
    plain = runner.invoke(app, ["report", "-c", cfg, "--fold", "4", "-o", str(tmp_path / "a.html")])
    assert plain.exit_code == 0 and "pass --metrics DIR where `pancseg evaluate -o DIR` wrote them" in plain.stderr
    found = runner.invoke(app, ["report", "-c", cfg, "--fold", "4", "-o", str(tmp_path / "b.html"), "--metrics",
                                str(metrics)])
    assert found.exit_code == 0, found.output
    assert "no evaluation" not in found.stderr and "id='evaluation'" in (tmp_path / "b.html").read_text()
    assert f"evaluated in <code>{metrics}</code>" in (tmp_path / "b.html").read_text()


def test_refuses_to_replace_another_file(trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "notes.html").write_text("<html><body>my own notes</body></html>")
    result = runner.invoke(app, ["report", "-c", str(trained_project / "pancseg.yaml"), "-o",
                                 str(tmp_path / "notes.html")])
    assert result.exit_code == 1
    assert f"{tmp_path / 'notes.html'} exists and is not a pancseg report" in result.stderr
    assert (tmp_path / "notes.html").read_text() == "<html><body>my own notes</body></html>"


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
def test_page_loads_in_headless_chromium(rendered: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", rendered.as_uri()],
        capture_output=True, text=True, encoding="utf-8", timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', done.stdout)
    assert loaded, "the page's load handler did not run"
    assert loaded.group(1) == loaded.group(2) == "4"
    console_errors = [line for line in done.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]
    assert not console_errors, console_errors


def test_figures_ignore_a_global_style_left_by_nnunet(trained_project: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """nnU-Net's progress plot sets seaborn's font scale 2.5 process-wide; the report must not inherit it."""
    import matplotlib

    from pancreas_cli import report as report_module
    from pancreas_cli.config import load_config

    sizes: list[float] = []
    real_save = report_module._save

    def spy(fig, path):  # type: ignore[no-untyped-def]
        sizes.append(matplotlib.rcParams["font.size"])
        return real_save(fig, path)

    monkeypatch.setattr(report_module, "_save", spy)
    with matplotlib.rc_context({"font.size": 30.0}):
        report_module.report(load_config(trained_project / "pancseg.yaml"), fold=4, out_html=tmp_path / "r.html")
    assert sizes and all(size == matplotlib.rcParamsDefault["font.size"] for size in sizes)
