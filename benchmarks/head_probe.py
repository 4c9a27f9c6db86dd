"""Linear probe of the subtype head's inputs (not part of CI).

After a learning check (``benchmarks/learning_check.py``), this feeds every training, validation and
test case through the trained network (checkpoint_best, sliding window, no mirroring), records the
head's input vector (pooled encoder features, averaged over tiles) and fits a logistic regression
on the training cases. It answers two questions the learning check cannot:

- does the head use what its features hold? (probe vs the head's own predictions, on the training
  cases and on the held-out ones);
- which pooling carries the subtype? (a probe per encoder stage and per pooling: global mean,
  lesion-weighted, pancreas-weighted).

    python benchmarks/head_probe.py --workdir /tmp/lc
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from learning_check import fold0_cases  # benchmarks/ is on sys.path when this script runs

from pancreas_cli.config import load_config
from pancreas_cli.metrics import classification_metrics
from pancreas_cli.nnunet_env import setup_nnunet_env


def _f1(truth: np.ndarray, predicted: np.ndarray) -> str:
    m = classification_metrics(truth.tolist(), predicted.tolist(), labels=(0, 1, 2))
    return f"macro-F1 {m.macro_f1:.2f} accuracy {m.accuracy:.2f} confusion {m.confusion_matrix}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="a learning check's --workdir")
    parser.add_argument("--checkpoint", default="checkpoint_best.pth")
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    config = load_config(args.workdir / "pancseg.yaml")
    setup_nnunet_env(config, device_type="cpu")
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from pancreas_cli.multitask.predictor import MultiTaskPredictor

    fold_dir = next(config.project_dir.glob("nnUNet_results/*/nnUNetTrainerMultiTask__*/fold_0"))
    predictor = MultiTaskPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                   perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(fold_dir.parent), use_folds=(0,),
                                                   checkpoint_name=args.checkpoint)
    net = predictor.network
    captured: list[torch.Tensor] = []
    net.head.mlp.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach().clone()))

    features, labels = {}, {}
    for name, cases in fold0_cases(config, args.workdir / "data").items():
        rows = []
        for _, image, _, _ in cases:
            captured.clear()
            array, properties = SimpleITKIO().read_images([str(image)])
            predictor.predict_single_npy_array(array, properties, None, None, False)
            rows.append(torch.cat(captured).mean(0).numpy())
        features[name], labels[name] = np.stack(rows), np.array([c[3] for c in cases])

    net.head.mlp.eval()
    with torch.no_grad():
        for name in features:
            own = net.head.mlp(torch.as_tensor(features[name])).argmax(1).numpy()
            print(f"head itself, {name} cases: {_f1(labels[name], own)}")

    def probe(columns: slice) -> np.ndarray:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
        model.fit(features["train"][:, columns], labels["train"])
        return model.predict(features["held-out"][:, columns])

    print(f"linear probe, all head inputs, held-out cases: {_f1(labels['held-out'], probe(slice(None)))}")
    channels = [net.encoder.output_channels[i] for i in net.stage_indices]
    poolings = ("mean", "lesion", "pancreas") if net.settings.pooling == "attention" else ("mean",)
    start = 0
    for stage, width in zip(net.stage_indices, channels):
        for pooling in poolings:  # the order ClassificationHead concatenates them in
            predicted = probe(slice(start, start + width))
            print(f"linear probe, stage {stage} {pooling} pooling, held-out cases: {_f1(labels['held-out'], predicted)}")
            start += width


if __name__ == "__main__":
    main()
