"""How much of each lesion the predicted whole pancreas holds, in a learning-check workdir (not CI).

The subtype head's pancreas-level features see an unsegmented lesion only where the decoder counts
it as pancreas. For each held-out case of fold 0 (``learning_check.fold0_cases``) this predicts the
whole-pancreas probability (labels 1+2, or the region) without mirroring and reports its mean over
the true lesion's voxels, per subtype (BENCHMARKS.md, "Subtype before the lesion").

    python benchmarks/lesion_coverage.py --workdir W [--checkpoint checkpoint_final.pth]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from learning_check import fold0_cases
from pancreas_cli.config import load_config
from pancreas_cli.layout import model_folder
from pancreas_cli.nnunet_env import setup_nnunet_env


def whole_pancreas(probabilities: np.ndarray) -> np.ndarray:
    """The whole pancreas' probability from nnU-Net's per-channel probabilities (regions: the first)."""
    return probabilities[0] if len(probabilities) == 2 else probabilities[1] + probabilities[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--checkpoint", default="checkpoint_final.pth")
    args = parser.parse_args()
    config = load_config(args.workdir / "pancseg.yaml")
    setup_nnunet_env(config)
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from pancreas_cli.multitask.predictor import MultiTaskPredictor

    torch.set_num_threads(1)
    predictor = MultiTaskPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                   perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder(config)), use_folds=(0,),
                                                   checkpoint_name=args.checkpoint)
    coverage: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for _, image, mask, subtype in fold0_cases(config, args.workdir / "data")["held-out"]:
        data, properties = SimpleITKIO().read_images([str(image)])
        _, probabilities = predictor.predict_single_npy_array(data, properties, None, None, True)
        lesion = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))) == 2
        coverage[subtype].append(float(whole_pancreas(probabilities)[lesion].mean()))
    every = [c for values in coverage.values() for c in values]
    print(json.dumps({"mean": round(statistics.mean(every), 3),
                      "by_subtype": {k: round(statistics.mean(v), 3) for k, v in coverage.items() if v}}))


if __name__ == "__main__":
    main()
