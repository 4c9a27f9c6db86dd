"""Throughput of a prediction split into parts: 1 against 2 processes on the same scans (not CI).

Modes (each timed as whole commands, Python start-up and model loading included, since that is
what a user waits for; repeats alternate ABBA, medians reported):

- ``parts`` (default): N = 1 is one ``pancseg predict``; N = 2 is ``--part 0/2`` and ``--part 1/2``
  started at the same moment as two commands (two terminals, two SLURM tasks); the wall time runs
  until both ended. Each process uses torch's default threads (as two commands would), unless
  ``--split-threads`` gives each ``OMP_NUM_THREADS`` = cores / N.
- ``devices``: ``pancseg predict --devices D`` (one worker) against ``--devices D,D`` (two worker
  processes on the same device: on a GPU, two processes sharing it; on the CPU the workers split the
  cores).

Every run predicts into a fresh folder; each N's masks are compared with N = 1's (they must be the
same bytes). Scans: ``--cases`` synthetic phantoms of ``--shape`` (larger than the smoke model's
patch, so a case is several tiles and the network, not start-up, dominates).

    python benchmarks/predict_parts.py --workdir /tmp/pp                         # CPU, parts
    python benchmarks/predict_parts.py --workdir /tmp/pp --mode devices --device cuda:0

Writes ``WORKDIR/predict_parts.json`` after every run.
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

from pancreas_cli.synth import synthesize


def _run(commands: list[list[str]], env: dict[str, str], logs: list[Path]) -> tuple[float, list[dict]]:
    """Start ``commands`` at once; the wall time until all ended, and their JSON results."""
    start = time.perf_counter()
    running = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                encoding="utf-8") for cmd in commands]
    done = [p.communicate() for p in running]
    seconds = time.perf_counter() - start
    for cmd, process, (stdout, stderr), log in zip(commands, running, done, logs):
        log.write_text(f"$ {' '.join(cmd)}\n{stdout}\n--- stderr ---\n{stderr}", encoding="utf-8")
        if process.returncode != 0:
            sys.exit(f"failed ({process.returncode}): {' '.join(cmd)}; see {log}")
    return seconds, [json.loads(stdout) for stdout, _ in done]


def _project(args: argparse.Namespace) -> Path:
    """A trained project: ``--project`` as it is, else a smoke model trained briefly in the workdir (its
    quality does not matter for throughput)."""
    if args.project:
        return args.project.resolve()
    project = args.workdir / "project"
    config = project / "pancseg.yaml"
    if not config.is_file():
        synthesize(project / "data", cases=8, shape=(24, 48, 48), seed=3)
        config.write_text(
            "project_dir: ./work\ndataset: {source: ./data}\nplan: {preset: smoke, num_processes: 1}\n"
            f"train: {{device: {args.device.split(',')[0]}, epochs: 1, iterations_per_epoch: 2, val_iterations: 1}}\n"
            "predict: {mirroring: false}\n", encoding="utf-8")
        for stage in (["prepare"], ["clean"], ["preprocess"], ["train", "--fold", str(args.fold)]):
            print(f"project: pancseg {stage[0]}", file=sys.stderr, flush=True)
            _run([[sys.executable, "-m", "pancreas_cli", *stage, "-c", str(config), "--json"]], dict(os.environ),
                 [args.workdir / f"project_{stage[0]}.log"])
    return project


def _scans(args: argparse.Namespace) -> Path:
    folder = args.workdir / "scans"
    if not folder.is_dir():
        source = args.workdir / "phantoms"
        synthesize(source, cases=args.cases, shape=tuple(int(s) for s in args.shape.split("x")), seed=7)
        folder.mkdir()
        for path in sorted(source.rglob("*_0000.nii.gz"))[:args.cases]:
            (folder / path.name).hardlink_to(path)
    return folder


def _commands(args: argparse.Namespace, project: Path, scans: Path, out: Path, n: int) -> list[list[str]]:
    base = [sys.executable, "-m", "pancreas_cli", "predict", "-c", str(project / "pancseg.yaml"), "-i", str(scans),
            "-o", str(out), "--fold", str(args.fold), "--json", "--set", f"predict.mirroring={str(args.mirroring).lower()}"]
    if args.mode == "devices":
        return [[*base, "--devices", ",".join([args.device] * n)]]
    device = ["--device", args.device]
    return [[*base, *device]] if n == 1 else [[*base, *device, "--part", f"{i}/{n}"] for i in range(n)]


def _masks(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.nii.gz"))}


def benchmark(args: argparse.Namespace) -> dict:
    project, scans = _project(args), _scans(args)
    cases = len(list(scans.glob("*.nii.gz")))
    report: dict = {"mode": args.mode, "device": args.device, "cases": cases, "shape": args.shape,
                    "mirroring": args.mirroring,
                    "cpu_count": os.cpu_count(), "split_threads": args.split_threads, "runs": []}
    reference: dict[str, bytes] | None = None
    order = [n for _ in range(args.repeats) for n in (1, 2, 2, 1)]
    for index, n in enumerate(order):
        out = args.workdir / f"out_{index}_n{n}"
        env = dict(os.environ)
        if args.split_threads and args.mode == "parts":
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
        logs = [args.workdir / f"run_{index}_n{n}_{i}.log" for i in range(n)]
        seconds, results = _run(_commands(args, project, scans, out, n), env, logs)
        masks = _masks(out)
        reference = reference if reference is not None else (masks if n == 1 else None)
        report["runs"].append({"n": n, "wall_s": round(seconds, 2), "cases_per_min": round(60 * cases / seconds, 2),
                               "engine_s": [r["seconds"] for r in results],
                               "predicted": sum(r["predicted"] for r in results),
                               "same_masks_as_n1": None if reference is None else masks == reference})
        print(json.dumps(report["runs"][-1]), file=sys.stderr, flush=True)
        (args.workdir / "predict_parts.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    for n in (1, 2):
        walls = [r["wall_s"] for r in report["runs"] if r["n"] == n]
        report[f"n{n}"] = {"median_wall_s": round(statistics.median(walls), 2),
                           "cases_per_min": round(60 * cases / statistics.median(walls), 2)}
    report["speedup_n2"] = round(report["n1"]["median_wall_s"] / report["n2"]["median_wall_s"], 3)
    (args.workdir / "predict_parts.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--project", type=Path, help="a trained pancseg project to use as it is")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--mode", choices=("parts", "devices"), default="parts")
    parser.add_argument("--device", default="cpu", help="for every process (devices mode: repeated N times)")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--shape", default="40x96x96", help="the scans' size (z x y x x)")
    parser.add_argument("--repeats", type=int, default=1, help="ABBA blocks (1, 2, 2, 1)")
    parser.add_argument("--mirroring", action="store_true", help="test-time mirroring on (default off: --fast)")
    parser.add_argument("--split-threads", action="store_true", help="parts mode: OMP_NUM_THREADS = cores / N")
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    report = benchmark(args)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
