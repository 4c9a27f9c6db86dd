"""The window on the CPU with ResEnc-M plans: torch against the optional inference runtimes (and
torch.compile, ``--compile``).

``predict_speed.py --backends`` times the runtimes with a trained model; training ResEnc-M on a
CPU takes days, so this builds the multi-task network of a preprocessed dataset's ResEnc-M plans
with random weights (the time of a network pass does not depend on the weights' values) and times
pancseg's window on one scan, preprocessed as nnU-Net does: torch (batch 2, as ``auto`` on a CPU)
and each runtime, alternating rounds, medians. The argmax of random weights means nothing, so only
the voxels where it differs from torch's are counted (float rounding). A runtime's first round
includes exporting and compiling the network (once per command in ``pancseg predict``); the speed-ups
are of the later rounds.

    python benchmarks/runtime_resenc_cpu.py --preprocessed P/work/nnUNet_preprocessed/Dataset001_PancreasCancer \\
        --scan W/inputs/64x128x176/quiz_020_0000.nii.gz --backends openvino,onnxruntime --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def _predictor(preprocessed: Path, configuration: str):  # type: ignore[no-untyped-def]
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from pancreas_cli.layout import TRAINERS
    from pancreas_cli.multitask.network import build_multitask_network
    from pancreas_cli.multitask.predictor import MultiTaskPredictor

    plans = PlansManager(json.loads((preprocessed / "nnUNetResEncUNetMPlans.json").read_text()))
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    manager = plans.get_configuration(configuration)
    torch.manual_seed(0)
    network = build_multitask_network(plans, manager, 1, 3, enable_deep_supervision=False).eval()
    predictor = MultiTaskPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                   perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                   allow_tqdm=False)
    predictor.manual_initialization(network, plans, manager, [network.state_dict()], dataset_json,
                                    TRAINERS["multitask"], (0, 1, 2))
    return predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preprocessed", type=Path, required=True, help="a dataset folder of nnUNet_preprocessed")
    parser.add_argument("--scan", type=Path, required=True, help="a CT scan (NIfTI)")
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--backends", default="openvino,onnxruntime")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also torch with predict.compile (inductor)")
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    args = parser.parse_args()
    from pancreas_cli.multitask.predictor import WindowSettings

    predictor = _predictor(args.preprocessed, args.configuration)
    pre = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, _ = pre.run_case([str(args.scan)], None, predictor.plans_manager, predictor.configuration_manager,
                              predictor.dataset_json)
    x = torch.from_numpy(data)
    variants = {name: WindowSettings(batch_size=2, region=False, keep_on_device=True, backend=name)
                for name in ["torch", *filter(None, args.backends.split(","))]}
    if args.compile:  # its first round compiles
        variants["torch+compile"] = WindowSettings(batch_size=2, region=False, keep_on_device=True, compile=True)
    forwards: dict[str, object] = {}  # per variant: its forward function, compiled once for torch+compile
    times: dict[str, list[float]] = {name: [] for name in variants}
    argmax: dict[str, torch.Tensor] = {}
    runtimes: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for name in variants if round_ % 2 == 0 else reversed(variants):
            predictor.window, predictor._batch_forward = variants[name], forwards.get(name)
            predictor._runtimes = runtimes.setdefault(name, {})  # exported once, as in one predict command
            start = time.perf_counter()
            logits = predictor.predict_logits_from_preprocessed_data(x)
            times[name].append(time.perf_counter() - start)
            forwards[name] = predictor._batch_forward
            argmax[name] = logits.argmax(0)
            print(f"round {round_}: {name} {times[name][-1]:.1f}s ({predictor.window_stats.describe()})",
                  file=sys.stderr, flush=True)
    timed = {k: statistics.median(v[1:] or v) for k, v in times.items()}  # a runtime's first round exports it
    result = {"shape_at_model_spacing": list(x.shape[1:]), "patch": predictor.configuration_manager.patch_size,
              "threads": torch.get_num_threads(), "seconds_after_the_first_round": timed, "rounds": times,
              "speedup_vs_torch": {k: timed["torch"] / v for k, v in timed.items()},
              "argmax_differs": {k: int((v != argmax["torch"]).sum()) for k, v in argmax.items()}}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
