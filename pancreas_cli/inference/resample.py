"""nnU-Net's resampling of images and logits as three matrix products on the predict device.

nnU-Net resamples a case's image to the plans' spacing before the network (cubic B-splines,
``scipy.ndimage.zoom`` through scikit-image, in float64 on the CPU) and the logits back to the input
grid after it (linear). Both are linear maps that act on each axis separately (a spline prefilter and
a tensor-product kernel per axis, or nnU-Net's "separate z" scheme: in-plane first, then nearest
along the thick axis), so the whole map is ``M_z (x) M_y (x) M_x``. Each per-axis matrix is read off
nnU-Net's own function by resampling unit impulses along that axis (cached per shape and spacing),
and applying them is three small matrix products, in float64, on a GPU or the CPU. The result is
nnU-Net's to float rounding, at a fraction of the time (a full abdominal CT: seconds of scipy on a
CPU core become milliseconds on a GPU).

Only nnU-Net's default resampling function (``resample_data_or_seg_to_shape``) is replaced, and only
for images and logits (segmentations are not linear in their labels); any other configured
function runs as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

#: The resampling functions whose image/probability paths are linear and separable per axis.
SEPARABLE = frozenset({"resample_data_or_seg_to_shape"})


@lru_cache(maxsize=64)
def _spline_matrix(n: int, m: int, order: int) -> np.ndarray:
    """The (m, n) matrix of scikit-image's ``resize`` (as nnU-Net calls it, without the clip) along one axis."""
    from skimage.transform import resize

    return resize(np.eye(n), (m, n), order=order, mode="edge", anti_aliasing=False, clip=False)


@lru_cache(maxsize=64)
def _nearest_matrix(n: int, m: int) -> np.ndarray:
    """The (m, n) matrix of nnU-Net's order-0 resampling along the thick axis (``map_coordinates``, nearest)."""
    coords = np.clip(np.round(n / m * (np.arange(m) + 0.5) - 0.5), 0, n - 1).astype(int)
    matrix = np.zeros((m, n))
    matrix[np.arange(m), coords] = 1.0
    return matrix


def _apply(matrix: np.ndarray, data: torch.Tensor, dim: int) -> torch.Tensor:
    weights = torch.from_numpy(matrix).to(device=data.device, dtype=data.dtype)
    return torch.movedim(torch.tensordot(weights, data, dims=([1], [dim])), 0, dim)


def _clip_like(out: torch.Tensor, source: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """scikit-image's ``clip``: each resized image within its input's range (reduced over ``dims``)."""
    return torch.clamp(out, source.amin(dim=dims, keepdim=True), source.amax(dim=dims, keepdim=True))


def resample_separable(data: np.ndarray | torch.Tensor, new_shape: Sequence[int], current_spacing: Sequence[float],
                       new_spacing: Sequence[float], *, order: int, order_z: int = 0,
                       force_separate_z: bool | None = None, device: torch.device,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """nnU-Net's ``resample_data_or_seg_to_shape`` of (C, X, Y, Z) images or logits, on ``device``.

    ``out_dtype`` is the dtype nnU-Net's function would return (its input's), so that the values are
    rounded as nnU-Net rounds them before anything compares them.
    """
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

    tensor = torch.as_tensor(data).to(device)
    shape = tuple(int(s) for s in tensor.shape[1:])
    target = tuple(int(s) for s in new_shape)
    if shape == target:  # nnU-Net returns such data as it is
        return tensor.to(out_dtype)
    source = tensor.to(torch.float64)
    separate, axis = determine_do_sep_z_and_axis(force_separate_z, current_spacing, new_spacing)
    if not separate:
        result = source
        for dim in range(3):
            result = _apply(_spline_matrix(shape[dim], target[dim], order), result, dim + 1)
        return _clip_like(result, source, (1, 2, 3)).to(out_dtype).contiguous()
    if order_z != 0:
        raise NotImplementedError("only nnU-Net's default order_z=0 is implemented")
    in_plane = [d for d in range(3) if d != axis]
    result = source
    for dim in in_plane:  # nnU-Net resizes each slice across the thick axis as a 2D image
        result = _apply(_spline_matrix(shape[dim], target[dim], order), result, dim + 1)
    result = _clip_like(result, source, tuple(d + 1 for d in in_plane))
    if shape[axis] != target[axis]:
        result = _apply(_nearest_matrix(shape[axis], target[axis]), result, axis + 1)
    return result.to(out_dtype).contiguous()


class DeviceResampling:
    """A ConfigurationManager whose image and logit resampling runs on ``device`` (see module doc).

    Everything else is the wrapped manager's. Images come back as float32 tensors on ``device``,
    logits in their input's dtype (nnU-Net's export rounds them so before the argmax).
    """

    def __init__(self, manager: Any, device: torch.device) -> None:
        self._manager = manager
        self._device = device

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    @staticmethod
    def replaces(function_name: str) -> bool:
        return function_name in SEPARABLE

    def _wrap(self, fn: Callable[..., Any], name: str, images: bool) -> Callable[..., Any]:
        if not self.replaces(name) or not hasattr(fn, "keywords"):
            return _on_cpu(fn)

        kwargs = dict(fn.keywords)
        if kwargs.pop("is_seg", False) or set(kwargs) - {"order", "order_z", "force_separate_z"} \
                or kwargs.get("order_z", 0) != 0:
            return _on_cpu(fn)

        def resample(data: Any, new_shape: Any, current_spacing: Any, new_spacing: Any) -> Any:
            if data is None:
                return fn(data, new_shape, current_spacing, new_spacing)
            dtype = torch.float32 if images else torch.as_tensor(data[:0]).dtype
            return resample_separable(data, new_shape, current_spacing, new_spacing, device=self._device,
                                      out_dtype=dtype, **kwargs)

        return resample

    @property
    def resampling_fn_data(self) -> Callable[..., Any]:
        manager = self._manager
        return self._wrap(manager.resampling_fn_data, manager.configuration["resampling_fn_data"], True)

    @property
    def resampling_fn_seg(self) -> Callable[..., Any]:
        """nnU-Net's, except for a constant mask (a CT's nonzero mask), which stays constant: no work."""
        fn = self._manager.resampling_fn_seg

        def resample(seg: Any, new_shape: Any, current_spacing: Any, new_spacing: Any) -> Any:
            if isinstance(seg, np.ndarray) and seg.size and (seg.flat[0] == seg).all():
                return np.full((seg.shape[0], *[int(s) for s in new_shape]), seg.flat[0], dtype=seg.dtype)
            return fn(seg, new_shape, current_spacing, new_spacing)

        return resample

    @property
    def resampling_fn_probabilities(self) -> Callable[..., Any]:
        manager = self._manager
        return self._wrap(manager.resampling_fn_probabilities, manager.configuration["resampling_fn_probabilities"],
                          False)


def _on_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` fed with NumPy arrays (nnU-Net's functions expect them; a GPU tensor would fail there)."""

    def resample(data: Any, *args: Any) -> Any:
        if isinstance(data, torch.Tensor):
            data = data.cpu().numpy()
        return fn(data, *args)

    return resample
