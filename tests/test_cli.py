"""The command line: global options, exit codes and error messages (CliRunner)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_config
from pancreas_cli import __version__
from pancreas_cli.cli import app
from pancreas_cli.config import CONFIG_TEMPLATE


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"pancseg {__version__}"


def test_python_m_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "pancreas_cli", "--version"], capture_output=True, text=True, encoding="utf-8")
    assert done.returncode == 0 and done.stdout.strip() == f"pancseg {__version__}"


def test_shell_completion_script_and_completions() -> None:
    """Typer's completion: the script for bash names pancseg, and the script's call completes commands.
    (Typer detects the shell that runs pancseg; its test switch lets the shell be named instead.)"""
    detect = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    done = subprocess.run([sys.executable, "-m", "pancreas_cli", "--show-completion", "bash"], capture_output=True,
                          text=True, encoding="utf-8", env=detect)
    assert done.returncode == 0 and "complete -o default -F _pancseg_completion pancseg" in done.stdout
    env = {**os.environ, "_PANCSEG_COMPLETE": "complete_bash", "COMP_WORDS": "pancseg ev", "COMP_CWORD": "1"}
    done = subprocess.run([sys.executable, "-m", "pancreas_cli"], capture_output=True, text=True, encoding="utf-8",
                          env=env)
    assert done.stdout.split() == ["evaluate"]


def test_help_lists_commands_without_importing_torch_or_nnunet() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from pancreas_cli.cli import app;"
        "r = CliRunner().invoke(app, ['--help']); print(r.exit_code);"
        "print(r.output); print('HEAVY', [m for m in ('torch', 'nnunetv2', 'SimpleITK') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", env={"COLUMNS": "200", "PATH": ""})
    assert done.stdout.startswith("0\n")
    for command in ("init", "synth", "prepare", "clean", "preprocess", "doctor"):
        assert command in done.stdout
    assert "HEAVY []" in done.stdout


def test_unknown_command_and_option_are_usage_errors(runner: CliRunner) -> None:
    assert runner.invoke(app, ["fly"]).exit_code == 2
    assert runner.invoke(app, ["prepare", "--bogus"]).exit_code == 2


def test_help_and_usage_errors_are_plain_text_when_not_a_terminal() -> None:
    """Colab `!` cells and CI logs get no box-drawing panels."""
    helped = subprocess.run([sys.executable, "-m", "pancreas_cli", "train", "--help"], capture_output=True, text=True, encoding="utf-8",
                            check=False)
    assert helped.returncode == 0 and "--set KEY=VALUE" in helped.stdout and "╭" not in helped.stdout
    usage = subprocess.run([sys.executable, "-m", "pancreas_cli", "train", "--bogus"], capture_output=True, text=True, encoding="utf-8",
                           check=False)
    assert usage.returncode == 2 and "No such option: --bogus" in usage.stderr and "╭" not in usage.stderr


def test_init_writes_template_and_refuses_to_overwrite(runner: CliRunner, tmp_path: Path) -> None:
    target = tmp_path / "cfg" / "pancseg.yaml"
    result = runner.invoke(app, ["init", str(target)])
    assert result.exit_code == 0 and target.read_text() == CONFIG_TEMPLATE.read_text()
    target.write_text("mine")
    again = runner.invoke(app, ["init", str(target)])
    assert again.exit_code == 1 and "already exists" in again.stderr
    assert target.read_text() == "mine"


def test_no_config_is_a_clear_error(runner: CliRunner, in_dir: Path) -> None:
    result = runner.invoke(app, ["prepare"])
    assert result.exit_code == 1
    assert "no config given" in result.stderr and "pancseg init" in result.stderr


def test_default_config_file_is_used(runner: CliRunner, in_dir: Path) -> None:
    write_config(in_dir, "dataset:\n  source: ./missing\n")
    result = runner.invoke(app, ["prepare"])
    assert result.exit_code == 1 and "dataset.source: folder not found" in result.stderr


def test_bad_config_one_line_per_field_no_traceback(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    cfg = write_config(tmp_path, "train:\n  epocs: 3\n  epochs: -1\n")
    result = runner.invoke(app, ["prepare", "-c", str(cfg)])
    assert result.exit_code == 1
    assert "train.epocs: unknown key (did you mean 'epochs'?)" in result.stderr
    assert "train.epochs: must be > 0" in result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_set_override_error_and_debug_traceback(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    cfg = write_config(tmp_path, "")
    result = runner.invoke(app, ["clean", "-c", str(cfg), "--set", "dataset.id=0"])
    assert result.exit_code == 1 and "dataset.id: must be >= 1 (from --set dataset.id=0)" in result.stderr
    assert f"invalid configuration in {cfg} with the command line's settings" in result.stderr
    flag = runner.invoke(app, ["train", "-c", str(cfg), "--epochs", "0"])
    assert flag.exit_code == 1 and "train.epochs: must be > 0 (from a command-line option)" in flag.stderr
    malformed = runner.invoke(app, ["clean", "-c", str(cfg), "--set", "dataset.id"])  # usage, like a bad option
    assert malformed.exit_code == 2 and "expected dotted.key=value" in malformed.stderr
    debug = runner.invoke(app, ["--debug", "clean", "-c", str(cfg), "--set", "dataset.id=0"])
    assert debug.exit_code == 1 and "Traceback" in debug.stderr


def test_file_system_errors_are_one_line(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk or a read-only folder is the machine's problem: one message naming the file."""
    from pancreas_cli import synth

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device", str(tmp_path / "syn" / "case.nii.gz"))

    monkeypatch.setattr(synth, "synthesize", full)
    result = runner.invoke(app, ["synth", str(tmp_path / "syn"), "--cases", "3"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"[Errno 28] No space left on device: '{tmp_path / 'syn' / 'case.nii.gz'}'; free some space" in result.stderr


def test_synth_cli(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "syn"
    result = runner.invoke(app, ["synth", str(out), "--cases", "3", "--shape", "16,32,32", "--quirks"])
    assert result.exit_code == 0, result.output
    assert "wrote 3 synthetic cases" in result.stdout and "quirks" in result.stdout
    assert (out / "test").is_dir()
    again = runner.invoke(app, ["synth", str(out), "--cases", "3", "--shape", "16,32,32"])
    assert again.exit_code == 1 and "--force" in again.stderr
    cues = runner.invoke(app, ["synth", str(tmp_path / "cues"), "--cases", "3", "--shape", "16,32,32",
                               "--cues", "size", "--cue-overlap", "0.5"])
    assert cues.exit_code == 0, cues.output


def test_synth_usage_errors(runner: CliRunner, tmp_path: Path) -> None:
    assert runner.invoke(app, ["synth", str(tmp_path / "a"), "--shape", "16,32"]).exit_code == 2
    assert runner.invoke(app, ["synth", str(tmp_path / "a"), "--layout", "zip"]).exit_code == 2
    assert runner.invoke(app, ["synth", str(tmp_path / "a"), "--cases", "0"]).exit_code == 2
    small = runner.invoke(app, ["synth", str(tmp_path / "a"), "--shape", "4,4,4"])
    assert small.exit_code == 1 and "error:" in small.stderr
    cues = runner.invoke(app, ["synth", str(tmp_path / "a"), "--cues", "colour"])
    assert cues.exit_code == 1 and "cues must be one of mixed, attenuation, texture, shape, size" in cues.stderr


def test_doctor_json_and_blocking_device(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    cfg = write_config(tmp_path, "train:\n  device: cuda:7\n")
    result = runner.invoke(app, ["doctor", "-c", str(cfg), "--json"])
    report = json.loads(result.stdout)
    device = next(c for c in report["checks"] if c["name"] == "device")
    assert device["status"] == "blocking" and result.exit_code == 1 and report["ok"] is False
    cpu = runner.invoke(app, ["doctor", "-c", str(cfg), "--set", "train.device=cpu", "--json"])
    checks = {c["name"]: c for c in json.loads(cpu.stdout)["checks"]}
    assert checks["config"]["status"] == "ok" and checks["device"]["status"] == "ok"
    assert checks["nnunetv2"]["detail"].startswith("2.8.")
    assert cpu.exit_code == (0 if all(c["status"] != "blocking" for c in checks.values()) else 1)


def test_doctor_checks_the_chosen_predict_backend(runner: CliRunner, tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    from pancreas_cli.inference import backends

    (tmp_path / "data").mkdir()
    cfg = write_config(tmp_path, "train:\n  device: cpu\npredict:\n  backend: openvino\n")
    real = importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None if name == "openvino" else real(name))
    result = runner.invoke(app, ["doctor", "-c", str(cfg), "--json"])
    check = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "predict backend")
    assert check["status"] == "blocking" and 'pip install "pancseg[openvino]"' in check["detail"]
    assert result.exit_code == 1
    plain = runner.invoke(app, ["doctor", "-c", str(cfg), "--set", "predict.backend=torch", "--json"])
    check = next(c for c in json.loads(plain.stdout)["checks"] if c["name"] == "predict backend")
    assert check["status"] == "ok" and check["detail"].startswith("torch; CPU runtimes installed: ")


def test_doctor_disk_need_follows_the_preset(tmp_path: Path, monkeypatch) -> None:
    """5 GiB is plenty for the smoke preset, not for a real dataset with ResEnc-M plans."""
    from collections import namedtuple

    from pancreas_cli import doctor as doctor_module

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(doctor_module.shutil, "disk_usage", lambda path: usage(0, 0, 5 * 1024**3))
    (tmp_path / "data").mkdir()
    for preset, status in (("smoke", "ok"), ("default", "blocking")):
        cfg = write_config(tmp_path, f"plan:\n  preset: {preset}\n")
        disk = next(c for c in doctor_module.doctor(cfg).checks if c.name == "disk")
        assert disk.status == status and f"the {preset} preset needs about" in disk.detail


def test_doctor_blocks_a_torchvision_built_for_another_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen in a container with a CPU torch and PyPI's CUDA torchvision: training ran, prediction
    failed at loading the model. doctor must say so before the user trains."""
    import importlib.abc
    import importlib.util
    import sys

    from pancreas_cli import doctor as doctor_module

    class BrokenTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            return importlib.util.spec_from_loader(name, self) if name == "torchvision" else None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenTorchvision(), *sys.meta_path])
    monkeypatch.setattr(doctor_module, "_version", lambda dist: "0.99.0")
    check = doctor_module.check_torchvision("2.13.0+cpu")
    assert check.status == "blocking"
    assert "torchvision 0.99.0 does not load with torch 2.13.0+cpu" in check.detail
    assert "torchvision::nms" in check.detail and "--force-reinstall torch torchvision" in check.detail
    monkeypatch.setattr(doctor_module, "_version", lambda dist: None)
    assert doctor_module.check_torchvision("2.13.0").status == "warning"


def test_doctor_finds_pancseg_yaml_in_the_current_folder(runner: CliRunner, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(tmp_path, "dataset:\n  source: ./nope\n")  # tmp_path / "pancseg.yaml"
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["doctor", "--json"])
    config = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "config")
    assert config["status"] == "blocking" and "dataset.source: folder not found" in config["detail"]


def test_doctor_reports_invalid_config(runner: CliRunner, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "dataset:\n  source: ./nope\n")
    result = runner.invoke(app, ["doctor", "-c", str(cfg)])
    assert result.exit_code == 1 and "dataset.source: folder not found" in result.stdout


def test_forked_workers_die_on_sigterm() -> None:
    """The commands turn SIGTERM into an interrupt; their forked workers must not inherit that (a
    pool's terminate() would hang on a worker whose handler came too late), only the default."""
    import multiprocessing
    import os
    import signal

    from pancreas_cli.signals import sigterm_as_interrupt

    with sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(2) as pool:
            assert pool.map(signal.getsignal, [signal.SIGTERM] * 2) == [signal.SIG_DFL] * 2
        worker = ctx.Process(target=signal.pause)
        worker.start()
        os.kill(worker.pid, signal.SIGTERM)
        worker.join(10)
        assert worker.exitcode == -signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
