"""``pancseg train --pretrained``: start a training from another model's weights (fine-tuning).

The source is a model archive (``pancseg export``: its first fold's checkpoint) or a checkpoint
file, read through :mod:`pancreas_cli.checkpoints` (no code runs from it unless ``--trust-model``).
Every tensor of the new network whose name and shape the source has is copied; the rest keeps
nnU-Net's initialisation: another number of classes changes the decoder's last layers, a
segmentation-only source has no subtype head. The report counts what was loaded per part
(``encoder``, ``decoder``, ``head``) and names the tensors whose shapes differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pancreas_cli.checkpoints import read_checkpoint
from pancreas_cli.exceptions import CheckpointError
from pancreas_cli.modelzip import open_model


@dataclass
class PretrainedReport:
    """What :func:`load_matching` copied: per part, tensors loaded and kept at their initialisation."""

    source: str  # the file, or the archive and the checkpoint inside it
    loaded: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    unused: int = 0  # source tensors the new network has no place for

    def lines(self) -> list[str]:
        parts = sorted(self.loaded.keys() | self.skipped.keys())
        counts = ", ".join(f"{p} {self.loaded.get(p, 0)}/{self.loaded.get(p, 0) + self.skipped.get(p, 0)}"
                           for p in parts)
        lines = [f"pretrained weights from {self.source}: tensors loaded per part: {counts}; "
                 f"{self.unused} source tensor(s) unused"]
        lines += [f"  not loaded, shapes differ: {key} {list(src)} (source) vs {list(dst)}"
                  for key, src, dst in self.mismatched]
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "loaded": self.loaded, "skipped": self.skipped, "unused": self.unused,
                "mismatched": [{"tensor": k, "source": list(s), "network": list(d)} for k, s, d in self.mismatched]}


def read_pretrained(path: Path, *, trust: bool = False) -> tuple[str, dict[str, Any]]:
    """What ``path`` is (the file, or the archive and its first fold's checkpoint) and its weights."""
    source = str(path)
    if path.suffix == ".zip" or path.is_dir():
        model = open_model(path)
        inside = f"fold_{model.manifest['folds'][0]}/{model.manifest['checkpoint']}"
        source, path = f"{path} ({inside})", model.model_dir / inside
    weights = read_checkpoint(path, trust=trust, required=("network_weights",))["network_weights"]
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: its network_weights are not a state dict; pass an nnU-Net checkpoint")
    # Saved from DDP: "module." before every name (nnU-Net's own loader strips it too).
    return source, {k.removeprefix("module."): v for k, v in weights.items()}


def load_matching(network: Any, weights: dict[str, Any], source: str) -> PretrainedReport:
    """Copy into ``network`` (unwrapped from DDP and torch.compile) every tensor of ``weights`` whose
    name and shape it has; :class:`CheckpointError` when none matches (another architecture)."""
    from pancreas_cli.multitask.predictor import unwrap

    module = unwrap(network)
    target = module.state_dict()
    report = PretrainedReport(source)
    chosen = {}
    for key, tensor in target.items():
        part = key.split(".", 1)[0]
        found = weights.get(key)
        if found is not None and tuple(found.shape) == tuple(tensor.shape):
            chosen[key] = found
            report.loaded[part] = report.loaded.get(part, 0) + 1
        else:
            report.skipped[part] = report.skipped.get(part, 0) + 1
            if found is not None:
                report.mismatched.append((key, tuple(found.shape), tuple(tensor.shape)))
    if not chosen:
        raise CheckpointError(f"{source}: no tensor of it fits this network (another architecture or plans); "
                              "pretrain with the same plans (`pancseg preprocess` with the same preset)")
    report.unused = len(set(weights) - set(chosen))
    module.load_state_dict(chosen, strict=False)
    return report
