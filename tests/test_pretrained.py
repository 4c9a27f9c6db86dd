"""``train --pretrained``: matching weights are copied, the rest keeps its initialisation, and the report
says which; a real training starts from the source's weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pancreas_cli.checkpoints import read_checkpoint
from pancreas_cli.cli import app
from pancreas_cli.exceptions import CheckpointError
from pancreas_cli.pretrained import load_matching


class _Net(torch.nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.encoder = torch.nn.Conv3d(1, 4, 3)
        self.decoder = torch.nn.Conv3d(4, classes, 1)


def test_matching_tensors_are_copied_and_the_rest_kept() -> None:
    source, net = _Net(3), _Net(5)  # another number of classes: the decoder's last layer differs
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = load_matching(net, source.state_dict(), "src.pth")
    assert torch.equal(net.encoder.weight, source.encoder.weight) and torch.equal(net.encoder.bias, source.encoder.bias)
    assert torch.equal(net.decoder.weight, before["decoder.weight"])
    assert report.loaded == {"encoder": 2} and report.skipped == {"decoder": 2} and report.unused == 2
    assert report.mismatched[0] == ("decoder.weight", (3, 4, 1, 1, 1), (5, 4, 1, 1, 1))
    assert "encoder 2/2" in report.lines()[0] and "decoder 0/2" in report.lines()[0]
    with pytest.raises(CheckpointError, match="no tensor of it fits"):
        load_matching(net, {"other.weight": torch.zeros(1)}, "src.pth")


@pytest.mark.slow
def test_training_starts_from_the_pretrained_weights(trained_project: Path, tmp_path: Path, runner: CliRunner,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Fold 3 trained for one epoch from fold 4's checkpoint: at the start of training its network holds
    fold 4's weights (all shapes match: same plans)."""
    from pancreas_cli.multitask.trainer import nnUNetTrainerMultiTask

    shutil.copytree(trained_project / "work", tmp_path / "work", ignore=shutil.ignore_patterns(".locks", "logs"))
    shutil.copy(trained_project / "pancseg.yaml", tmp_path / "pancseg.yaml")
    source = next((tmp_path / "work").glob("nnUNet_results/*/*/fold_4/checkpoint_final.pth"))
    at_start = {}
    original = nnUNetTrainerMultiTask.on_train_start

    def snapshot(self) -> None:
        original(self)
        at_start.update({k: v.detach().clone() for k, v in self.network.state_dict().items()})

    monkeypatch.setattr(nnUNetTrainerMultiTask, "on_train_start", snapshot)
    result = runner.invoke(app, ["train", "-c", str(tmp_path / "pancseg.yaml"), "--fold", "3", "--pretrained",
                                 str(source), "--set", "train.iterations_per_epoch=1"])
    assert result.exit_code == 0, result.output
    weights = read_checkpoint(source)["network_weights"]
    assert at_start.keys() == weights.keys() and all(torch.equal(at_start[k], weights[k]) for k in weights)
    assert "tensors loaded per part: decoder" in result.stderr and "0 source tensor(s) unused" in result.stderr
    log = next((tmp_path / "work").glob("nnUNet_results/*/*/fold_3/training_log_*.txt")).read_text()
    assert "pretrained weights from" in log
    resumed = runner.invoke(app, ["train", "-c", str(tmp_path / "pancseg.yaml"), "--fold", "3", "--resume",
                                  "--pretrained", str(source)])
    assert resumed.exit_code == 1 and "--pretrained starts a new training" in resumed.stderr
