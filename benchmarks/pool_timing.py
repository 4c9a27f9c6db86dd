"""The head's pooling of one encoder stage on a GPU: half-precision product against a float32 copy (not CI).

Under autocast the encoder's features are float16. The head pools them with float32 sums, either
from the features as they are (``_pool``'s GPU path: a product with float32 output) or from a
float32 copy (its path elsewhere, e.g. on the CPU; BENCHMARKS.md has the numbers). This times forward
+ backward of both on the shape of ResEnc-M's finest pooled stage at nnU-Net's batch for these plans
(28 x 64 channels x 32^3, attention maps from 32x64x64) and reports how far apart their averages and
gradients are.

    python benchmarks/pool_timing.py            # needs CUDA; prints one JSON report
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pancreas_cli.multitask.network import _pool, _stage_maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="28,64,32,32,32", help="features B,C,D,H,W")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    b, c, *size = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    device = torch.device("cuda")
    features = (torch.randn(b, c, *size, device=device) * 2 + 1).half().requires_grad_()
    attention = torch.rand(b, 2, size[0], size[1] * 2, size[2] * 2, device=device)
    maps = _stage_maps(attention, [features])[0]
    upstream = torch.randn(b, 3 * c, device=device) * 1e3  # a loss-scaled gradient of the averages

    def half() -> torch.Tensor:
        return _pool(features, maps)

    def copy() -> torch.Tensor:
        return _pool(features.float(), maps)

    results: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                  "features": list(features.shape)}
    outputs = {}
    for name, pool in (("half", half), ("float32_copy", copy)):
        features.grad = None
        pooled = pool()
        pooled.backward(upstream)
        outputs[name] = (pooled.detach(), features.grad.float())
    times: dict[str, list[float]] = {"half": [], "float32_copy": []}
    for i in range(args.repeats + 5):
        for name, pool in ((("half", half), ("float32_copy", copy)) if i % 2 else (("float32_copy", copy), ("half", half))):
            torch.cuda.synchronize()
            start = time.perf_counter()
            features.grad = None
            pool().backward(upstream)
            torch.cuda.synchronize()
            if i >= 5:
                times[name].append(time.perf_counter() - start)
    (p_half, g_half), (p_copy, g_copy) = outputs["half"], outputs["float32_copy"]
    results["ms_forward_backward"] = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    results["pooled_max_abs_difference"] = (p_half - p_copy).abs().max().item()
    results["pooled_max_abs"] = p_copy.abs().max().item()
    results["gradient_max_relative_difference"] = ((g_half - g_copy).abs().max() / g_copy.abs().max()).item()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
