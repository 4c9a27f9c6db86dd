"""Time per training step of the multi-task trainer against the stock one, in one process (not CI).

The learning check's ratio times whole epochs, which include waiting for nnU-Net's data-augmentation
workers; on a GPU with a large batch the workers can set the pace, and then both trainers wait alike
and the epoch times say little about what the head costs. Here both trainers are built on the same
plans and fold, their ``train_step`` runs on the same cached batches, alternating (ABBA), each step
timed to the end of its device work; the ratio of the medians is what the multi-task trainer adds
to a step. It also times how fast the workers deliver batches, which says whether epochs are bound
by them (then the epoch ratio is nearer 1 than the step ratio), and counts the operators each step
dispatches (what the CPU launches).

``--live-blocks N`` adds what whole epochs measure, without a process and a trainer per sample:
blocks of real iterations (each trainer's own loader, then its ``train_step``), ABBA, the time per
iteration per block, split into waiting for the batch and the step (the CPU's time in it: for a step
that does not wait for the GPU, the time to queue its work). Here the workers augment while the
steps run, as in training, and compete with the main thread for the CPU (on an H200, with a step that
waited for the GPU, whole epochs read 1.06-1.08 where cached steps read 1.02: CHANGELOG.md).

    python benchmarks/step_timing.py --workdir /tmp/lc_steps --preset default --device cuda --shape 32,64,64

``--compile-head`` adds a third trainer, the multi-task one with its head compiled (torch.compile,
forward and backward): whether fusing the head's ~140 small operators into a few kernels takes its
CPU-side work off the step.

``--profile-dir DIR`` adds torch.profiler tables (which operators the multi-task step adds, on the
GPU and the CPU), two per trainer in ABBA order, and the kernels' busy time per step to the report.

The workdir's data and preprocessing are made as for learning_check.py (and reused when present);
the trainers write to a temporary results folder, so earlier training results are left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from learning_check import add_workdir_arguments, setup_workdir  # benchmarks/ is on sys.path when run
from pancreas_cli.config import Config
from pancreas_cli.devices import training_device
from pancreas_cli.layout import TRAINERS
from pancreas_cli.nnunet_env import setup_nnunet_env
from pancreas_cli.train import _preprocessed_state, _stop_loaders, build_trainer, write_training_inputs


def _build(config: Config, task: str, fold: int, device: Any) -> Any:
    """A trainer of ``task`` as ``pancseg train`` builds it, ready to step (loaders started)."""
    trainer = build_trainer(config, _preprocessed_state(config), TRAINERS[task], fold, device,
                            continue_training=False)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    return trainer


def _timed_step(trainer: Any, batch: dict, sync: Any) -> float:
    start = time.perf_counter()
    trainer.train_step(batch)
    sync()
    return time.perf_counter() - start


def _count_ops(trainer: Any, batch: dict, sync: Any) -> int:
    """Operators dispatched by one train step (views and casts included): on a GPU each costs CPU
    time to launch, which adds to the step wherever the GPU waits for the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.ops += 1
            return func(*args, **(kwargs or {}))

    with Count() as count:
        trainer.train_step(batch)
        sync()
    return count.ops


def _abba(tasks: list[str], i: int) -> list[str]:
    """Round ``i`` of an ABBA order: whichever runs second inherits the first one's process state."""
    return tasks if i % 4 in (0, 3) else tasks[::-1]


def _ratios(seconds: dict[str, float]) -> dict[str, float]:
    """Each trainer's time over the stock trainer's."""
    return {task: value / seconds["segmentation"] for task, value in seconds.items() if task != "segmentation"}


def _live(trainers: dict[str, Any], blocks: int, iterations: int, warmup: int, sync: Any) -> dict[str, Any]:
    """Blocks of real training iterations per trainer (ABBA): seconds per iteration of each block, and
    the mean time per iteration spent waiting for a batch and inside ``train_step``. Each block first
    runs ``warmup`` untimed iterations: while the other trainer ran, this one's workers filled its
    queues, which would hide how fast they deliver. The device is synchronised only around a block,
    as in epochs: a step that does not wait for the GPU (the multi-task one) returns once its work is
    queued, and its next iterations overlap that work."""
    blocks_s: dict[str, list[float]] = {task: [] for task in trainers}
    wait: dict[str, float] = dict.fromkeys(trainers, 0.0)
    step: dict[str, float] = dict.fromkeys(trainers, 0.0)
    for block in range(blocks):
        for task in _abba(list(trainers), block):
            trainer = trainers[task]
            for _ in range(warmup):
                trainer.train_step(next(trainer.dataloader_train))
            sync()
            begin = time.perf_counter()
            for _ in range(iterations):
                start = time.perf_counter()
                batch = next(trainer.dataloader_train)
                loaded = time.perf_counter()
                trainer.train_step(batch)
                wait[task] += loaded - start
                step[task] += time.perf_counter() - loaded
            sync()
            blocks_s[task].append((time.perf_counter() - begin) / iterations)
    n = blocks * iterations
    medians = {task: statistics.median(v) for task, v in blocks_s.items()}
    return {"iteration_seconds": medians, "ratios": _ratios(medians),
            "wait_seconds_per_iteration": {t: v / n for t, v in wait.items()},
            "step_seconds_per_iteration": {t: v / n for t, v in step.items()}, "blocks": blocks_s}


def _add_compiled_head(trainers: dict[str, Any], config: Config, fold: int, device: Any, batch: dict) -> str | None:
    """Add a multi-task trainer whose head is compiled, after one step that compiles it; a failure
    (e.g. no Triton or C compiler on the machine) is returned for the report and the rest still runs."""
    from pancreas_cli.multitask.predictor import unwrap

    trainer = _build(config, "multitask", fold, device)
    unwrap(trainer.network).head.compile()
    try:
        trainer.train_step(batch)
    except Exception as exc:  # reported, not hidden: the report's compile_head_error
        _stop_loaders(trainer)
        return f"{type(exc).__name__}: {exc}"
    trainers["multitask_compiled_head"] = trainer
    return None


def _profile(trainer: Any, batches: list[dict], sync: Any, steps: int, table: Path) -> dict[str, float]:
    """Profile ``steps`` train steps: operator table (by device time, then by CPU time) to ``table``;
    returns the kernels' busy time, the launches and the wall time per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for i in range(steps):
            trainer.train_step(batches[i % len(batches)])
            sync()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    device_key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(events.table(sort_by=device_key, row_limit=40) + "\n\n"
                     + events.table(sort_by="self_cpu_time_total", row_limit=25))
    busy = sum(getattr(e, device_key) for e in events if e.device_type.name == "CUDA") / 1e6  # us -> s
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"))
    return {"device_busy_seconds_per_step": busy / steps, "kernel_launches_per_step": launches / steps,
            "wall_seconds_per_step": wall / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir_arguments(parser)
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per trainer first")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches, cached and reused")
    parser.add_argument("--loader-batches", type=int, default=20, help="batches drawn to time the workers")
    parser.add_argument("--profile-dir", type=Path, help="also profile --profile-steps steps of each trainer "
                        "(torch.profiler): operator tables there, device-busy time per step in the report")
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--live-blocks", type=int, default=0, help="blocks of real iterations per trainer "
                        "(loader + train_step, as in epochs); 0: none")
    parser.add_argument("--live-iterations", type=int, default=40, help="timed iterations per block")
    parser.add_argument("--live-warmup", type=int, default=30, help="untimed iterations first in each block")
    parser.add_argument("--compile-head", action="store_true",
                        help="also time the multi-task trainer with its head compiled (torch.compile)")
    args = parser.parse_args()

    config = setup_workdir(args, epochs=50, iterations=250, val_iterations=1)
    device = training_device(config.train.device)
    setup_nnunet_env(config, device_type=device.type)
    results = Path(tempfile.mkdtemp(prefix="pancseg_steps_"))
    os.environ["nnUNet_results"] = str(results)  # before nnU-Net is imported: it reads the folders once
    write_training_inputs(config)

    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as pancseg train
    with redirect_stdout(sys.stderr):  # nnU-Net's prints; the report alone goes to stdout
        trainers = {task: _build(config, task, args.fold, device) for task in ("segmentation", "multitask")}
        batches = [next(trainers["multitask"].dataloader_train) for _ in range(args.batches)]
        compile_error = _add_compiled_head(trainers, config, args.fold, device, batches[0]) if args.compile_head else None
        for trainer in trainers.values():
            for i in range(args.warmup):
                _timed_step(trainer, batches[i % len(batches)], sync)
        times: dict[str, list[float]] = {task: [] for task in trainers}
        for i in range(args.steps):
            for task in _abba(list(trainers), i):
                times[task].append(_timed_step(trainers[task], batches[i % len(batches)], sync))
        live = _live(trainers, args.live_blocks, args.live_iterations, args.live_warmup, sync) if args.live_blocks else None
        ops = {task: _count_ops(trainers[task], batches[0], sync) for task in ("segmentation", "multitask")}
        # ABBA: whether a trainer's CPU side is slower under the profiler because of its own work or
        # because of when it ran (a profile run second has shown every operator's CPU time higher).
        profiles: dict[str, list[dict[str, float]]] = {task: [] for task in trainers}
        for i, task in enumerate(("segmentation", "multitask", "multitask", "segmentation") if args.profile_dir else ()):
            profiles[task].append(_profile(trainers[task], batches, sync, args.profile_steps,
                                           args.profile_dir / f"profile_{task}_{i}.txt"))
        # The workers' queues are full by now: drain them (nnU-Net's two queues of max(6, n // 2)
        # batches and one per worker), then time steady delivery.
        loader = trainers["multitask"].dataloader_train
        workers = int(os.environ["nnUNet_n_proc_DA"])
        for _ in range(2 * max(6, workers // 2) + workers + 1 if workers else 0):
            next(loader)
        start = time.perf_counter()
        for _ in range(args.loader_batches):
            next(loader)
        loader_seconds = (time.perf_counter() - start) / args.loader_batches
        for trainer in trainers.values():
            _stop_loaders(trainer)
    shutil.rmtree(results, ignore_errors=True)

    medians = {task: statistics.median(samples) for task, samples in times.items()}
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "plans": _preprocessed_state(config)["plans_identifier"],
        "configuration": config.plan.configuration,
        "batch_shape": list(batches[0]["data"].shape),
        "data_augmentation_workers": workers,
        "steps_per_trainer": args.steps,
        "step_seconds": medians,
        "step_ratios": _ratios(medians),
        "loader_seconds_per_batch": loader_seconds,
        "dispatched_ops_per_step": ops,
        "samples": times,
    }
    if live:
        report["live"] = live
    if compile_error:
        report["compile_head_error"] = compile_error
    if args.profile_dir:
        report["profile"] = profiles
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
