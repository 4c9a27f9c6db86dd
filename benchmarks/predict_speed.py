"""Prediction speed: stock nnU-Net against ``pancseg predict`` on the same model and scans (not CI).

Both predict the same scans with the same trained model folder, fold and checkpoint, test-time
mirroring on, tile step 0.5, Gaussian weighting. Stock is nnU-Net's own prediction as
``nnUNetv2_predict`` runs it (``nnUNetPredictor`` with its defaults, ``predict_from_files`` with 3
preprocessing and 3 export workers, the trainer found through ``nnUNet_extTrainer``), run as its own
command; pancseg is the ``pancseg predict`` command. Runs alternate (ABBA per repeat); the ratio is
of medians. Each run reports its whole command's time and its engine's time (the command without
Python's start-up, imports and model loading), so start-up is not mistaken for speed.

Scans: per size, ``--cases`` synthetic CTs with per-case voxel spacing like the quiz data's (in-plane
0.66-0.84 mm, 2.0 mm slices: the model resamples them to its 0.75 mm, as on real data). "crop"
sizes are the phantom as synthesized (a pancreas crop like the quiz's, ~64x130x180); a size larger
than the crop embeds the crop in an abdomen (soft tissue in an elliptic body, air around it), like
a full CT in which the pancreas is small.

    python benchmarks/predict_speed.py --workdir /tmp/ps                 # CPU, smoke model
    python benchmarks/predict_speed.py --workdir /tmp/ps --device cuda --preset default

Writes ``WORKDIR/predict_speed.json`` after every run (a run stopped half-way keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pancreas_cli.metrics import dice
from pancreas_cli.synth import synthesize

CROP = (64, 128, 176)  # the synthetic phantom's crop, as the model is trained on (z, y, x); --crop changes it

STOCK = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
model, fold, checkpoint, device, inp, out = sys.argv[1:7]
predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                            perform_everything_on_device=True, device=torch.device(device), verbose=False,
                            verbose_preprocessing=False, allow_tqdm=False)
predictor.initialize_from_trained_model_folder(model, (int(fold),), checkpoint_name=checkpoint)
t1 = time.perf_counter()
predictor.predict_from_files(inp, out, save_probabilities=False, overwrite=True, num_processes_preprocessing=3,
                             num_processes_segmentation_export=3)
t2 = time.perf_counter()
print("STOCK_TIMES " + json.dumps({"startup": t1 - t0, "engine": t2 - t1}))
"""


def _run(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log.write_text(f"$ {' '.join(cmd)}\n{done.stdout}\n--- stderr ---\n{done.stderr}")
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")
    return seconds, done.stdout


def _project(args: argparse.Namespace) -> Path:
    """A trained project (fold 0): ``--project`` as it is, else one built in the workdir."""
    if args.project:
        return args.project.resolve()
    project = args.workdir / "project"
    config = project / "pancseg.yaml"
    if not config.is_file():
        synthesize(project / "data", cases=args.train_cases, shape=args.crop, seed=3)
        config.write_text(
            "project_dir: ./work\ndataset: {source: ./data}\n"
            f"plan: {{preset: {args.preset}, num_processes: {args.processes}}}\n"
            f"train: {{device: {args.device}, epochs: {args.epochs}, iterations_per_epoch: {args.iterations}, "
            f"val_iterations: 4, save_every: 5, da_workers: {args.processes}}}\n")
    for stage in (["prepare"], ["clean"], ["preprocess"], ["train", "--fold", "0"]):
        print(f"project: pancseg {stage[0]}", file=sys.stderr, flush=True)
        _run([sys.executable, "-m", "pancreas_cli", *stage, "-c", str(config)], dict(os.environ),
             args.workdir / f"project_{stage[0]}.log")
    return project


def _abdomen(crop: np.ndarray, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """``crop`` (HU) in the middle of a body of soft tissue, air around it."""
    zz, yy, xx = np.ogrid[:shape[0], :shape[1], :shape[2]]
    body = ((yy - shape[1] / 2) / (0.45 * shape[1])) ** 2 + ((xx - shape[2] / 2) / (0.48 * shape[2])) ** 2 <= 1
    volume = np.where(body, 40.0, -1000.0) + rng.normal(0, 12, shape)
    volume = np.broadcast_to(volume, shape).copy()
    start = [(s - c) // 2 for s, c in zip(shape, crop.shape)]
    volume[tuple(slice(b, b + c) for b, c in zip(start, crop.shape))] = crop
    return volume.astype(np.int16)


def _scans(args: argparse.Namespace, size: tuple[int, int, int]) -> Path:
    """``--cases`` scans of ``size`` (z, y, x) with quiz-like per-case spacing, written once."""
    folder = args.workdir / "inputs" / "x".join(map(str, size))
    if folder.is_dir() and len(list(folder.glob("*_0000.nii.gz"))) == args.cases:
        return folder
    source = args.workdir / "inputs" / "phantom"
    if not source.is_dir():
        synthesize(source, cases=max(args.cases, 5), shape=args.crop, seed=11)
    phantoms = sorted(source.rglob("*_0000.nii.gz"))[:args.cases]
    rng = np.random.default_rng(5)
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(phantoms):
        crop = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float64)
        volume = crop if size == args.crop else _abdomen(crop, size, rng)
        image = sitk.GetImageFromArray(volume.astype(np.int16))
        in_plane = float(rng.uniform(0.66, 0.84))
        image.SetSpacing((in_plane, in_plane, 2.0))
        sitk.WriteImage(image, str(folder / f"case{i:02d}_0000.nii.gz"), True)
    return folder


def _model_dir(project: Path) -> Path:
    return next((project / "work" / "nnUNet_results").glob("Dataset*/nnUNetTrainerMultiTask__*"))


def _stock(args: argparse.Namespace, project: Path, scans: Path, out: Path, log: Path) -> dict:
    from pancreas_cli.nnunet_env import TRAINER_DIR

    env = dict(os.environ, nnUNet_raw=str(project / "work" / "nnUNet_raw"),
               nnUNet_preprocessed=str(project / "work" / "nnUNet_preprocessed"),
               nnUNet_results=str(project / "work" / "nnUNet_results"), nnUNet_extTrainer=str(TRAINER_DIR))
    seconds, stdout = _run([sys.executable, "-c", STOCK, str(_model_dir(project)), "0", "checkpoint_best.pth",
                            args.device, str(scans), str(out)], env, log)
    times = json.loads(stdout.split("STOCK_TIMES ", 1)[1].splitlines()[0])
    return {"command": seconds, **times}


def _pancseg(args: argparse.Namespace, project: Path, scans: Path, out: Path, log: Path, *extra: str) -> dict:
    seconds, stdout = _run([sys.executable, "-m", "pancreas_cli", "predict", "-c", str(project / "pancseg.yaml"),
                            "-i", str(scans), "-o", str(out), "--fold", "0", "--checkpoint", "best", "--device",
                            args.device, "--force", "--json", *extra], dict(os.environ), log)
    result = json.loads(stdout)
    cases = [c for c in result["cases"] if c["status"] == "predicted"]
    split = {stage: sum(c["times"].get(stage, 0.0) for c in cases) for stage in ("read", "network", "export")}
    windows = [c["window"] for c in cases if c.get("window")]
    return {"command": seconds, "engine": result["seconds"], "split": split,
            "tiles": sum(w["tiles"] for w in windows), "mirrored": sum(w["mirrored"] for w in windows),
            "passes": sum(w["passes"] for w in windows), "stock_passes": sum(w["stock_passes"] for w in windows),
            "fallbacks": [w["fallback"] for w in windows if w["fallback"]]}


def _agreement(ours: Path, stock: Path) -> list[dict]:
    rows = []
    for mask in sorted(stock.glob("*.nii.gz")):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(ours / mask.name)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))
        rows.append({"case": mask.name, "dice_pancreas": dice(a > 0, b > 0), "dice_lesion": dice(a == 2, b == 2),
                     "voxels_differ": int((a != b).sum()), "lesion_voxels": int((b == 2).sum())})
    return rows


def _subtypes(folder: Path) -> dict[str, str]:
    lines = (folder / "subtype_results.csv").read_text().splitlines()[1:]
    return dict(line.split(",") for line in lines)


def _size_report(runs: dict[str, list[dict]], cases: int) -> dict:
    median = {tool: {key: statistics.median(r[key] for r in rs) for key in ("command", "engine")}
              for tool, rs in runs.items() if rs}
    report: dict = {"runs": runs, "median": median}
    if "stock" in median and "pancseg" in median:
        report["ratio_command"] = median["stock"]["command"] / median["pancseg"]["command"]
        report["ratio_engine"] = median["stock"]["engine"] / median["pancseg"]["engine"]
        report["seconds_per_case"] = {tool: m["engine"] / cases for tool, m in median.items()}
    return report


def _timed(device, fn):  # type: ignore[no-untyped-def]
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - start


def contributions(args: argparse.Namespace, project: Path, scans: Path) -> dict:
    """In-process, one scan: each step of the engine against nnU-Net's (preprocessing, window, export).

    Window variants run in rounds (the first a warm-up: cuDNN picks its kernels per batch shape),
    in alternating order; medians of the timed rounds.
    """
    import tempfile

    import torch

    from pancreas_cli.config import load_config
    from pancreas_cli.nnunet_env import setup_nnunet_env

    device = torch.device(args.device)
    setup_nnunet_env(load_config(project / "pancseg.yaml"), device_type=device.type)
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    from pancreas_cli.inference.export import segmentation_from_logits, write_segmentation
    from pancreas_cli.inference.resample import DeviceResampling
    from pancreas_cli.multitask.predictor import MultiTaskPredictor, WindowSettings, unwrap
    from pancreas_cli.predict import batch_size

    predictor = MultiTaskPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                   perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                   allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(_model_dir(project)), use_folds=(0,),
                                                   checkpoint_name="checkpoint_best.pth")
    predictor._compiled = {}  # per variant: its forward function (compiled once for the compile variant)
    scan = str(sorted(scans.glob("*_0000.nii.gz"))[0])
    pre = predictor.configuration_manager.preprocessor_class(verbose=False)
    on_device = DeviceResampling(predictor.configuration_manager, device)
    table: dict = {}
    (data, _, props), table["preprocess_nnunet"] = _timed(device, lambda: pre.run_case(
        [scan], None, predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json))
    table["preprocess_pancseg"] = _timed(device, lambda: pre.run_case(
        [scan], None, predictor.plans_manager, on_device, predictor.dataset_json))[1]
    x = torch.from_numpy(data)
    auto = batch_size("auto", device)
    pad = device.type == "cuda"
    variants = {"nnunet": None, **{f"batch{b}": WindowSettings(batch_size=b, region=False, keep_on_device=True,
                                                               pad_batches=pad) for b in args.batch_sweep},
                f"batch{auto}+region": WindowSettings(batch_size=auto, region=True, keep_on_device=True,
                                                      pad_batches=pad)}
    if device.type == "cuda":  # tensor cores prefer channels-last activations (not a setting yet: measured first)
        variants[f"batch{auto}+channels_last"] = WindowSettings(batch_size=auto, region=False, keep_on_device=True,
                                                                pad_batches=pad)
    for backend in args.backends:  # an inference runtime for the network (CPU); the head stays in torch
        variants[f"batch{auto}+{backend}"] = WindowSettings(batch_size=auto, region=False, keep_on_device=True,
                                                            pad_batches=pad, backend=backend)
    if args.compile_variant:  # its first (untimed on CUDA) round includes compiling
        variants[f"batch{auto}+compile"] = WindowSettings(batch_size=auto, region=False, keep_on_device=True,
                                                          pad_batches=pad, compile=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    logits, last, runtimes = None, {}, {}
    network = unwrap(predictor.network)
    for round_ in range(args.contrib_rounds + (device.type == "cuda")):
        names = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        for name in names:
            predictor.window = variants[name]
            predictor._batch_forward = predictor._compiled.get(name)
            network.to(memory_format=torch.channels_last_3d if name.endswith("channels_last")
                       else torch.contiguous_format)
            predictor._runtimes = runtimes.setdefault(name, {})  # a backend variant's exported network, kept
            logits, seconds = _timed(device, lambda: predictor.predict_logits_from_preprocessed_data(x))
            predictor._compiled[name] = predictor._batch_forward
            last[name] = logits.argmax(0)
            if round_ or device.type != "cuda":
                times[name].append(seconds)
            table[f"window_{name}_stats"] = predictor.window_stats.describe() if variants[name] else "nnU-Net's"
            print(f"  contributions: {name} {seconds:.2f}s", file=sys.stderr, flush=True)
    for name, values in times.items():
        table[f"window_{name}"] = statistics.median(values)
    for backend in args.backends if f"batch{auto}" in last else ():  # float rounding: voxels whose argmax
        table[f"window_batch{auto}+{backend}_argmax_differs"] = int(  # differs from torch's (model grid)
            (last[f"batch{auto}+{backend}"] != last[f"batch{auto}"]).sum())
    with tempfile.TemporaryDirectory() as tmp:
        cpu_logits = logits.cpu()
        table["export_nnunet"] = _timed(device, lambda: export_prediction_from_logits(
            cpu_logits, props, predictor.configuration_manager, predictor.plans_manager, predictor.dataset_json,
            f"{tmp}/a", False))[1]
        table["export_pancseg"] = _timed(device, lambda: write_segmentation(segmentation_from_logits(
            logits.to(device), props, predictor.plans_manager, on_device, predictor.label_manager), props,
            predictor.plans_manager, predictor.dataset_json, Path(tmp) / "b"))[1]
        a = sitk.GetArrayFromImage(sitk.ReadImage(f"{tmp}/a.nii.gz"))
        b = sitk.GetArrayFromImage(sitk.ReadImage(f"{tmp}/b.nii.gz"))
        table["export_voxels_differ"] = int((a != b).sum())
    table["shape_at_model_spacing"] = list(x.shape[1:])
    return table


def benchmark(args: argparse.Namespace) -> dict:
    project = _project(args)
    report: dict = {"device": args.device, "model": str(_model_dir(project)), "cases": args.cases, "sizes": {}}
    out_json = args.workdir / "predict_speed.json"
    for size in args.sizes:
        name = "x".join(map(str, size))
        scans = _scans(args, size)
        runs: dict[str, list[dict]] = {"stock": [], "pancseg": []}
        entry = report["sizes"][name] = {"scans": str(scans)}
        if args.contributions:
            entry["contributions"] = contributions(args, project, scans)
            out_json.write_text(json.dumps(report, indent=1))
        if args.contributions_only:
            continue
        order = [tool for _ in range(args.repeats) for tool in ("stock", "pancseg", "pancseg", "stock")]
        for k, tool in enumerate(order):
            out = args.workdir / "out" / name / f"{tool}{k}"
            log = args.workdir / "logs" / f"{name}_{tool}{k}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            run = (_stock if tool == "stock" else _pancseg)(args, project, scans, out, log)
            runs[tool].append(run)
            print(f"{name} {tool}: command {run['command']:.1f}s engine {run['engine']:.1f}s", file=sys.stderr,
                  flush=True)
            entry.update(_size_report(runs, args.cases))
            entry["agreement"] = (_agreement(out, args.workdir / "out" / name / "stock0")
                                  if tool == "pancseg" and runs["stock"] else entry.get("agreement"))
            out_json.write_text(json.dumps(report, indent=1))
        if args.reference:  # pancseg's un-accelerated path (nnU-Net's window and export): same subtypes?
            ref = args.workdir / "out" / name / "reference"
            entry["reference"] = _pancseg(args, project, scans, ref, args.workdir / "logs" / f"{name}_ref.log",
                                          "--set", "predict.engine=nnunet")
            ours = args.workdir / "out" / name / "pancseg1"
            entry["same_subtypes"] = _subtypes(ref) == _subtypes(ours)
            entry["reference_vs_stock"] = _agreement(ref, args.workdir / "out" / name / "stock0")
            out_json.write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--project", type=Path, help="a trained pancseg project (fold 0) to use as it is")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="smoke", help="smoke (CPU) or default (ResEnc-M)")
    parser.add_argument("--sizes", default="64x128x176,120x256x256",
                        help="z x y x x per size; the crop's size is the phantom as synthesized")
    parser.add_argument("--crop", default="x".join(map(str, CROP)), help="the phantom's size (z x y x x)")
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="ABBA blocks per size")
    parser.add_argument("--reference", action="store_true", help="also run pancseg's un-accelerated path once")
    parser.add_argument("--contributions", action="store_true",
                        help="first time each engine step in-process on one scan per size")
    parser.add_argument("--contributions-only", action="store_true")
    parser.add_argument("--contrib-rounds", type=int, default=2)
    parser.add_argument("--compile-variant", action="store_true", help="also time the window with predict.compile")
    parser.add_argument("--batch-sweep", default="1,2,4,8", help="batch sizes of the window timed in-process")
    parser.add_argument("--backends", default="", help="also time the window with these predict.backend runtimes "
                        "(onnxruntime,openvino; CPU)")
    parser.add_argument("--train-cases", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    args.batch_sweep = [int(b) for b in args.batch_sweep.split(",")]
    args.backends = [b for b in args.backends.split(",") if b]
    args.crop = tuple(int(v) for v in args.crop.split("x"))
    args.contributions = args.contributions or args.contributions_only
    report = benchmark(args)
    summary = {name: {k: v for k, v in entry.items() if k.startswith("ratio") or k == "seconds_per_case"}
               for name, entry in report["sizes"].items()}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
