"""``pancseg demo``: the whole pipeline on a synthetic dataset, on the CPU, in minutes.

Writes a synthetic dataset with the real data's quirks and a config using the smoke preset, then
runs :func:`pancreas_cli.run.run`. Re-running continues where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pancreas_cli.config import Config, load_config
from pancreas_cli.exceptions import OutputExistsError
from pancreas_cli.imageio import write_text
from pancreas_cli.subtypes import image_name
from pancreas_cli.synth import synthesize

#: Sized so that the demo finishes in under 10 minutes on 2 CPU cores. The tiny network predicts
#: only background for its first 200-500 iterations (BENCHMARKS.md); small volumes (a step costs a
#: third of one at 32x64x64) buy 900 iterations, well past that, where 400 at 32x64x64 were not.
DEMO_CASES = 24
DEMO_SHAPE = (24, 48, 48)
DEMO_EPOCHS = 36
DEMO_ITERATIONS = 25


@dataclass(frozen=True)
class DemoBudget:
    cases: int = DEMO_CASES
    epochs: int = DEMO_EPOCHS
    iterations: int = DEMO_ITERATIONS


def demo_config_text(budget: DemoBudget) -> str:
    return (
        f"# Written by `pancseg demo`: {budget.cases} synthetic cases, the smoke preset, CPU training.\n"
        "project_dir: ./work\n"
        "dataset:\n"
        "  source: ./data\n"
        "  test_labels: ./data/test_ground_truth\n"
        "  test_subtypes_csv: ./data/test_ground_truth/subtypes.csv\n"
        "plan:\n  preset: smoke\n  num_processes: 1\n"
        "train:\n  device: cpu\n"
        f"  epochs: {budget.epochs}\n  iterations_per_epoch: {budget.iterations}\n"
        "  val_iterations: 4\n  save_every: 2\n"
        "predict:\n  device: cpu\n  mirroring: false\n"
        "evaluate:\n  bootstrap: 500\n"
    )


def _settings(config_text: str) -> list[str]:
    """The lines that matter (comments change between versions)."""
    return [line for line in config_text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def prepare_demo(workdir: Path, budget: DemoBudget = DemoBudget()) -> Config:
    """Synthesize the data and write the config (once); returns the loaded config."""
    config_path = workdir / "pancseg.yaml"
    text = demo_config_text(budget)
    if config_path.is_file() and _settings(config_path.read_text(encoding="utf-8")) != _settings(text):
        raise OutputExistsError(f"{config_path} exists with other settings; use another --workdir or delete it")
    cases = len(list((workdir / "data").rglob(image_name("*"))))
    if cases and cases != budget.cases:
        raise OutputExistsError(f"{workdir / 'data'} holds {cases} synthetic cases, not {budget.cases}; "
                                "use another --workdir or delete it")
    if not (workdir / "data").is_dir():
        synthesize(workdir / "data", cases=budget.cases, shape=DEMO_SHAPE, quirks=True, seed=0)
    write_text(text, config_path)
    return load_config(config_path)
