"""Learning check for the multi-task trainer (not part of CI).

Synthesizes a dataset, runs prepare -> clean -> preprocess -> train (smoke preset, CPU by default),
predicts the validation and test cases with the multi-task predictor and reports whole-pancreas Dice,
lesion Dice and subtype macro-F1. Optionally times a training iteration of the multi-task trainer
against the stock trainer on the same configuration (same run, ABBA order, medians).

    python benchmarks/learning_check.py --workdir /tmp/lc

``--cues``/``--cue-overlap`` pick synth's subtype cue profile, ``--budget short`` (600 iterations) checks
the subtype before the decoder has found the lesion.

The defaults fit the 15-minute budget on a 2-core CPU: 60 cases of 24x48x48 voxels, 75 epochs x 25
iterations (about 8.7 s per epoch). At 32x64x64 an iteration costs 2.3 times as much, and the 950
iterations that fit were too few for the lesion in 2 runs of 3 (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pancreas_cli.clean import clean
from pancreas_cli.config import Config, DatasetConfig, load_config
from pancreas_cli.layout import CHECKPOINT_BEST, fold_folder, model_folder
from pancreas_cli.metrics import classification_metrics, dice
from pancreas_cli.prepare import discover_cases, prepare
from pancreas_cli.preprocess import preprocess
from pancreas_cli.synth import synthesize
from pancreas_cli.train import train

Case = tuple[str, Path, Path, int]  # case id, image, mask, subtype
BUDGETS = {"short": (24, 25), "default": (75, 25)}  # epochs, iterations per epoch
EXTRA_SEED_OFFSET = 10_000  # --extra-held-out cases: other seeds than the project's (synth's cases are per seed and index)


def _subtypes(path: Path) -> dict[str, int]:
    with path.open(newline="") as fh:
        return {r["case_id"]: int(r["subtype"]) for r in csv.DictReader(fh)}


def fold0_cases(config, data: Path) -> dict[str, list[Case]]:
    """Fold 0's training cases and its held-out ones (its validation cases + the synthetic test set)."""
    raw = config.dataset_raw_dir
    subtypes = _subtypes(raw / "subtypes.csv")
    split = json.loads((raw / "splits_final.json").read_text())[0]
    labelled = {name: [(k, raw / "imagesTr" / f"{k}_0000.nii.gz", raw / "labelsTr" / f"{k}.nii.gz", subtypes[k])
                       for k in split[part]] for name, part in (("train", "train"), ("held-out", "val"))}
    truth = data / "test_ground_truth"
    labelled["held-out"] += [(k, data / "test" / f"{k}_0000.nii.gz", truth / f"{k}.nii.gz", s)
                             for k, s in _subtypes(truth / "subtypes.csv").items()]
    return labelled


def extra_cases(args: argparse.Namespace, work: Path) -> list[Case]:
    """``--extra-held-out`` more synthetic cases of the same kind (another seed), all held out: 18 held-out
    cases give a macro-F1 whose standard error is about 0.1, so single runs differ by up to 0.3."""
    if not args.extra_held_out:
        return []
    data = work / "extra"
    if not data.is_dir():
        synthesize(data, cases=args.extra_held_out, shape=tuple(int(s) for s in args.shape.split(",")),
                   seed=EXTRA_SEED_OFFSET + args.seed, cues=args.cues, cue_overlap=args.cue_overlap)
    truth = data / "test_ground_truth"
    subtypes = _subtypes(truth / "subtypes.csv")
    return [(f"extra_{c.case_id}", c.image, c.mask or truth / f"{c.case_id}.nii.gz",
             subtypes[c.case_id] if c.subtype is None else c.subtype)
            for c in discover_cases(DatasetConfig(source=data))]


def _predict(fold_dir: Path, cases: list[Case], out: Path, device: str) -> tuple[list[dict], float]:
    """Each case's Dice scores and subtype (true, predicted), and the seconds per case."""
    import torch

    from pancreas_cli.multitask.predictor import MultiTaskPredictor

    out.mkdir(parents=True, exist_ok=True)
    predictor = MultiTaskPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                   perform_everything_on_device=device != "cpu", device=torch.device(device),
                                   allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(fold_dir.parent), use_folds=(0,),
                                                   checkpoint_name=CHECKPOINT_BEST)
    start = time.perf_counter()
    predictor.predict_from_files_sequential([[str(c[1])] for c in cases], [str(out / c[0]) for c in cases],
                                            save_probabilities=False, overwrite=True)
    seconds = time.perf_counter() - start
    rows = []
    for (case, _, mask, subtype), probs in zip(cases, predictor.case_class_probabilities):
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        ref = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))).astype(np.uint8)
        rows.append({"whole": dice(pred > 0, ref > 0), "lesion": dice(pred == 2, ref == 2), "truth": subtype,
                     "predicted": int(np.argmax(probs))})
    return rows, seconds / len(cases)


def _summary(rows: list[dict]) -> dict:
    cls = classification_metrics([r["truth"] for r in rows], [r["predicted"] for r in rows], labels=(0, 1, 2))
    return {"cases": len(rows), "dice_pancreas": float(np.mean([r["whole"] for r in rows])),
            "dice_lesion": float(np.mean([r["lesion"] for r in rows])), "accuracy": cls.accuracy,
            "macro_f1": cls.macro_f1, "confusion_matrix": cls.confusion_matrix}


def evaluate(fold_dir: Path, cases: list[Case], extra: list[Case], out: Path, device: str) -> dict:
    """``evaluation`` over fold 0's held-out cases; with extra cases also ``evaluation_extended`` over both."""
    rows, seconds = _predict(fold_dir, cases + extra, out, device)
    report = {"evaluation": {**_summary(rows[: len(cases)]), "predict_seconds_per_case": seconds}}
    if extra:
        report["evaluation_extended"] = _summary(rows)
    return report


def _epoch_times(fold_dir: Path) -> list[float]:
    with (fold_dir / "metrics.csv").open(newline="") as fh:
        return [float(r["epoch_time_s"]) for r in csv.DictReader(fh)]


def add_workdir_arguments(parser: argparse.ArgumentParser) -> None:
    """The data and configuration options, shared with step_timing.py."""
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--shape", default="24,48,48")
    parser.add_argument("--pooling", choices=("attention", "mean"), default="attention")
    parser.add_argument("--preset", choices=("smoke", "default"), default="smoke")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cues", default="mixed", help="synth's subtype cue profile (pancseg synth --cues)")
    parser.add_argument("--cue-overlap", type=float, default=0.0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as pancseg's --set (e.g. train.head_lr=0.003)")


def setup_workdir(args: argparse.Namespace, *, epochs: int, iterations: int, val_iterations: int) -> Config:
    """Synthesize the data (once), write the workdir's config and run the data stages.

    Each stage is skipped when the workdir already holds its output for the same data and preset.
    """
    work = args.workdir.absolute()
    data = work / "data"
    if not data.is_dir():
        synthesize(data, cases=args.cases, shape=tuple(int(s) for s in args.shape.split(",")), seed=args.seed,
                   quirks=True, cues=args.cues, cue_overlap=args.cue_overlap)
    cfg_path = work / "pancseg.yaml"
    cfg_path.write_text(
        "project_dir: ./work\ndataset: {source: ./data}\n"
        f"plan: {{preset: {args.preset}}}\n"
        f"train: {{device: {args.device}, epochs: {epochs}, iterations_per_epoch: {iterations}, "
        f"val_iterations: {val_iterations}, head_pooling: {args.pooling}, save_every: 10}}\n"
    )
    config = load_config(cfg_path, args.overrides)
    prepare(config)
    clean(config)
    preprocess(config)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir_arguments(parser)
    parser.add_argument("--epochs", type=int, default=75)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--budget", choices=tuple(BUDGETS), help="short: 24 x 25 = 600 iterations (the lesion "
                        "is usually not found yet); default: 75 x 25 = 1875; sets --epochs and --iterations")
    parser.add_argument("--val-iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); on a CPU shared with other "
                        "jobs use 1: OpenMP's threads wait for each other there (a smoke step took 7.4 s with 2, 1.1 s "
                        "with 1 on the 2-core machine under load)")
    parser.add_argument("--extra-held-out", type=int, default=0, metavar="N", help="also predict N more synthetic "
                        "cases (another seed, same cues) and report evaluation_extended over all held-out cases")
    parser.add_argument("--evaluate-only", action="store_true", help="predict with the workdir's trained fold 0 "
                        "(no training): e.g. again with --extra-held-out")
    parser.add_argument("--timing-repeats", type=int, default=0, help="alternating stock/multi-task timing runs")
    parser.add_argument("--timing-iterations", type=int, default=20)
    args = parser.parse_args()
    if args.budget:
        args.epochs, args.iterations = BUDGETS[args.budget]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with redirect_stdout(sys.stderr):  # nnU-Net's prints; the report alone goes to stdout
        report = _run(args)
    print(json.dumps(report, indent=2))


def _run(args: argparse.Namespace) -> dict:
    work = args.workdir.absolute()
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    t0 = time.perf_counter()
    config = setup_workdir(args, epochs=args.epochs, iterations=args.iterations, val_iterations=args.val_iterations)
    report["data_stages_seconds"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    if args.evaluate_only:
        fold_dir = fold_folder(model_folder(config), 0)
        if not (fold_dir / CHECKPOINT_BEST).is_file():
            raise SystemExit(f"--evaluate-only: no trained fold 0 in {fold_dir}")
    else:
        result = train(config, folds=[0], force=True)
        report["train_seconds"] = round(time.perf_counter() - t0, 1)
        fold_dir = result.folds[0].output_folder
        report["last_epoch"] = result.folds[0].last
        report["iterations"] = args.epochs * args.iterations

    cases = fold0_cases(config, work / "data")["held-out"]
    report.update(evaluate(fold_dir, cases, extra_cases(args, work), work / "predictions", args.device))
    (work / "benchmark.json").write_text(json.dumps(report, indent=2))  # kept if the timing is cut short

    if args.timing_repeats:
        timing = {"segmentation": [], "multitask": []}
        for repeat in range(args.timing_repeats):
            # ABBA order: whichever runs second in a pair inherits the first one's process state.
            for task in ("segmentation", "multitask")[:: 1 if repeat % 2 == 0 else -1]:
                cfg = load_config(config.config_path, [*args.overrides, f"train.task={task}", "train.epochs=3",
                                             f"train.iterations_per_epoch={args.timing_iterations}",
                                             "train.val_iterations=1"])
                run = train(cfg, folds=[1], force=True)
                timing[task] += [t / args.timing_iterations for t in _epoch_times(run.folds[0].output_folder)[1:]]
                report["timing"] = {"samples": timing}  # kept if the call's limit cuts the timing short
                (work / "benchmark.json").write_text(json.dumps(report, indent=2))
        stock, multi = statistics.median(timing["segmentation"]), statistics.median(timing["multitask"])
        report["timing"] = {"seconds_per_iteration_stock": stock, "seconds_per_iteration_multitask": multi,
                            "ratio": multi / stock, "samples": timing}
    (work / "benchmark.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
