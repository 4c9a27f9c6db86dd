"""Tests for pancreas_cli.multitask.refit: what the shortcut reads per tile, the fit, the refit in place."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from pancreas_cli.multitask import refit as refit_module
from pancreas_cli.multitask.network import SHORTCUT_GAINS, build_multitask_network
from pancreas_cli.multitask.predictor import MultiTaskPredictor, unwrap
from pancreas_cli.multitask.refit import CaseTiles, case_probabilities, collect, fit_shortcut, recorder, refit
from pancreas_cli.preprocess import SMOKE_CONFIGURATION
from test_network import DATASET_JSON, make_plans

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PATCH = [8, 16, 16]
IMAGE = (1, 12, 24, 20)  # 2 x 2 x 2 tiles at step 0.5
HEAD = {"pancreas": True, "pancreas_version": 3, "dropout": 0.3}


def _network_and_managers() -> tuple[torch.nn.Module, PlansManager, object]:
    manager = PlansManager(make_plans(patch=PATCH, head=HEAD))
    cm = manager.get_configuration(SMOKE_CONFIGURATION)
    torch.manual_seed(0)
    network = build_multitask_network(manager, cm, 1, 3, enable_deep_supervision=False)
    with torch.no_grad():  # a trained shortcut: not the zeros it starts from
        network.head.shortcut.weight.normal_(0, 0.05)
        network.head.shortcut.bias.normal_(0, 0.05)
    network.eval()
    return network, manager, cm


def _gain() -> float:
    return SHORTCUT_GAINS[HEAD["pancreas_version"]]


def test_collected_tiles_give_the_predictors_case_probabilities() -> None:
    """The tiles' MLP logits, shortcut features and weights reproduce what inference computes for the case
    (un-mirrored), so the fit optimises the subtype inference will give."""
    network, manager, cm = _network_and_managers()
    images = [torch.randn(*IMAGE, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    tiles = collect(recorder(network, manager, cm, DATASET_JSON, "nnUNetTrainerMultiTask", torch.device("cpu")),
                    images)
    head = network.head
    assert [t.features.shape for t in tiles] == [(8, head.pancreas.size)] * 2
    assert [t.offsets.shape for t in tiles] == [(8, 3)] * 2 and all((t.weights > 0).all() for t in tiles)
    plain = MultiTaskPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                               perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    plain.manual_initialization(network, manager, cm, None, DATASET_JSON, "nnUNetTrainerMultiTask", (0, 1, 2))
    for image in images:
        plain.predict_sliding_window_return_logits(image)
    weight = head.shortcut.weight.detach().double() * _gain()
    bias = head.shortcut.bias.detach().double() * _gain()
    np.testing.assert_allclose(case_probabilities(tiles, weight, bias).numpy(),
                               np.stack(plain.case_class_probabilities), rtol=1e-4, atol=1e-6)
    # the shortcut's share is really in the offsets' complement: without it the answer differs
    assert not np.allclose(case_probabilities(tiles, weight * 0, bias * 0).numpy(),
                           np.stack(plain.case_class_probabilities), atol=1e-4)
    assert not head.shortcut._forward_hooks  # the recording hook is removed


def _synthetic(n: int, seed: int, informative: bool = True, confident_mlp: bool = False,
               features: int = 8) -> tuple[list[CaseTiles], list[int]]:
    """Cases of 1-3 tiles whose first three features carry the subtype (or nothing), with an MLP that
    knows nothing (small random logits) or is confidently right."""
    rng = np.random.default_rng(seed)
    labels = [int(k) for k in rng.integers(0, 3, n)]
    cases = []
    for label in labels:
        t = int(rng.integers(1, 4))
        x = rng.normal(size=(t, features))
        if informative:
            x[:, label] += 3.0
        offsets = rng.normal(scale=0.1, size=(t, 3))
        if confident_mlp:
            offsets[:, label] += 8.0
        cases.append(CaseTiles(offsets, x, rng.uniform(0.1, 1.0, t)))
    return cases, labels


def _accuracy(cases: list[CaseTiles], labels: list[int], weight: torch.Tensor, bias: torch.Tensor) -> float:
    return float((case_probabilities(cases, weight, bias).argmax(1).numpy() == np.array(labels)).mean())


def test_fit_learns_the_subtype_from_the_features_and_generalises() -> None:
    cases, labels = _synthetic(60, seed=0)
    weight, bias = fit_shortcut(cases, labels, None)
    assert _accuracy(cases, labels, weight, bias) >= 0.9
    held_out, held_labels = _synthetic(60, seed=1)
    assert _accuracy(held_out, held_labels, weight, bias) >= 0.85
    # the informative features carry the weight: each class's own feature has its largest coefficient
    assert [int(i) for i in weight[:, :3].argmax(1)] == [0, 1, 2]
    # deterministic: the same cases give the same fit
    again = fit_shortcut(cases, labels, None)
    torch.testing.assert_close(again[0], weight)


def test_fit_adds_nothing_where_the_mlp_is_already_right() -> None:
    cases, labels = _synthetic(40, seed=2, informative=False, confident_mlp=True)
    weight, bias = fit_shortcut(cases, labels, None)
    assert _accuracy(cases, labels, weight, bias) == 1.0
    assert weight.abs().max() < 0.05
    unchanged = case_probabilities(cases, weight * 0, bias * 0)
    assert (case_probabilities(cases, weight, bias) - unchanged).abs().max() < 0.01


def test_an_anchored_fit_stays_at_a_shortcut_that_already_fits() -> None:
    """The refit's prior is the trained shortcut: where that already explains the training cases (with
    the MLP), the fit keeps it; where it does not, the fit moves away from it as far as the cases ask."""
    cases, labels = _synthetic(60, seed=6, informative=False, confident_mlp=True)
    generator = torch.Generator().manual_seed(0)
    trained = (0.3 * torch.randn(3, 8, generator=generator, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    weight, bias = fit_shortcut(cases, labels, None, anchor=trained)
    assert (weight - trained[0]).norm() < 0.2 * trained[0].norm()
    cases, labels = _synthetic(60, seed=6)
    wrong = (-fit_shortcut(cases, labels, None)[0], torch.zeros(3, dtype=torch.float64))
    assert _accuracy(cases, labels, *wrong) < 0.2
    weight, bias = fit_shortcut(cases, labels, None, anchor=wrong)
    assert _accuracy(cases, labels, weight, bias) >= 0.9


def test_stronger_penalty_gives_smaller_weights_and_class_weights_count() -> None:
    cases, labels = _synthetic(60, seed=3)
    loose, _ = fit_shortcut(cases, labels, None, c=10.0)
    tight, _ = fit_shortcut(cases, labels, None, c=0.01)
    assert tight.norm() < 0.5 * loose.norm()
    # a class weighted up wins more cases
    plain_w, plain_b = fit_shortcut(cases, labels, None, c=0.01)
    up_w, up_b = fit_shortcut(cases, labels, [1.0, 1.0, 20.0], c=0.01)
    assert (case_probabilities(cases, up_w, up_b).argmax(1) == 2).sum() > \
        (case_probabilities(cases, plain_w, plain_b).argmax(1) == 2).sum()


def test_refit_changes_only_the_shortcut() -> None:
    network, _, _ = _network_and_managers()
    head = network.head
    before = {k: v.clone() for k, v in network.state_dict().items()}
    cases, labels = _synthetic(30, seed=4, features=head.pancreas.size)
    result = refit(head, cases, labels, None)
    assert not result.skipped and result.cases == 30
    assert result.accuracy_after >= 0.75 and result.accuracy_before <= 0.5
    after = network.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["head.shortcut.bias", "head.shortcut.weight"]
    trained = (before["head.shortcut.weight"].double() * _gain(), before["head.shortcut.bias"].double() * _gain())
    weight, bias = fit_shortcut(cases, labels, None, anchor=trained)
    torch.testing.assert_close(head.shortcut.weight.double() * _gain(), weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.shortcut.bias.double() * _gain(), bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, single_subtype", [(refit_module.MIN_CASES - 1, False), (20, True)])
def test_refit_keeps_the_trained_shortcut_without_enough_cases(n: int, single_subtype: bool) -> None:
    network, _, _ = _network_and_managers()
    head = network.head
    cases, labels = _synthetic(n, seed=5, features=head.pancreas.size)
    if single_subtype:
        labels = [1] * n
    trained = head.shortcut.weight.clone()
    result = refit(head, cases, labels, None)
    assert "too few to refit on" in result.skipped and result.accuracy_after == result.accuracy_before
    assert torch.equal(head.shortcut.weight, trained)


def test_networks_without_pancreas_features_have_no_shortcut() -> None:
    manager = PlansManager(make_plans(patch=PATCH, head={"dropout": 0.3}))
    cm = manager.get_configuration(SMOKE_CONFIGURATION)
    network = build_multitask_network(manager, cm, 1, 3, enable_deep_supervision=False)
    assert refit_module.shortcut_of(network) is None
    assert refit_module.shortcut_of(_network_and_managers()[0]) is not None
    assert refit_module.shortcut_of(unwrap(torch.nn.Linear(2, 2))) is None
