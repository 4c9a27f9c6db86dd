"""What predict's optional outputs cost on a full-size CT grid, without a model (not part of CI).

A 512 x 512 x ``--slices`` CT with a pancreas and a lesion: the time of the statistics, the preview and
writing the class probabilities (noisy logits everywhere: the worst case for their compression), and
the probability file's size.

    python benchmarks/outputs_cost.py --workdir /tmp/outputs_cost
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pancreas_cli.outputs.preview import render_preview
from pancreas_cli.outputs.probabilities import write_probabilities
from pancreas_cli.outputs.statistics import case_statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--slices", type=int, default=100)
    args = parser.parse_args()
    shape = (args.slices, 512, 512)
    z = args.slices // 2
    ct = np.full(shape, -1000, np.int16)
    ct[:, 60:450, 40:470] = 40
    labels = np.zeros(shape, np.uint8)
    labels[z - 10:z + 10, 250:300, 200:330] = 1
    labels[z - 5:z + 5, 260:285, 260:290] = 2
    ct_image, mask = sitk.GetImageFromArray(ct), sitk.GetImageFromArray(labels)
    for image in (ct_image, mask):
        image.SetSpacing((0.8, 0.8, 2.5))
    args.workdir.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(mask, str(args.workdir / "mask.nii.gz"))
    logits = np.random.default_rng(0).normal(size=(3, *shape)).astype(np.float32)
    logits[0] += 8
    logits[1][labels > 0] += 10
    logits[2][labels == 2] += 12
    exp = np.exp(logits - logits.max(0))
    probabilities = exp / exp.sum(0)
    target = args.workdir / "probabilities.nii.gz"
    for name, run in (("statistics", lambda: case_statistics("c", mask, ct_image, [0.2, 0.3, 0.5])),
                      ("preview", lambda: render_preview("c", ct_image, mask, args.workdir / "c.png")),
                      ("probabilities", lambda: write_probabilities(probabilities, args.workdir / "mask.nii.gz",
                                                                    target))):
        start = time.perf_counter()
        run()
        print(f"{name}: {time.perf_counter() - start:.2f} s")
    print(f"probability file: {target.stat().st_size / 2**20:.0f} MiB for {'x'.join(map(str, shape))} voxels")


if __name__ == "__main__":
    main()
