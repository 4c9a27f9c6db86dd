"""Tests for pancreas_cli.multitask.optim: SGD for the segmentation network, AdamW for the head."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pancreas_cli.exceptions import TrainError
from pancreas_cli.multitask.optim import HEAD_WEIGHT_DECAY, MultiTaskOptimizer, build_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(4, 8)
        self.decoder = nn.Linear(8, 2)
        self.head = nn.Linear(8, 3)

    def loss(self, cls_weight: float = 1.0) -> torch.Tensor:
        torch.manual_seed(1)
        features = self.encoder(torch.randn(5, 4))
        seg = self.decoder(features).pow(2).mean()
        cls = nn.functional.cross_entropy(self.head(features), torch.tensor([0, 1, 2, 0, 1]))
        return seg + cls_weight * cls


def test_parameters_split_between_sgd_and_adamw() -> None:
    net = Toy()
    optimizer, _ = build_optimizer(net, net.head, initial_lr=0.01, head_lr=1e-3, weight_decay=3e-5, max_steps=10)
    assert isinstance(optimizer.segmentation, torch.optim.SGD)
    assert isinstance(optimizer.head, torch.optim.AdamW)
    seg_ids = {id(p) for p in optimizer.segmentation_parameters()}
    head_ids = {id(p) for g in optimizer.head.param_groups for p in g["params"]}
    assert head_ids == {id(p) for p in net.head.parameters()}
    assert seg_ids == {id(p) for n, p in net.named_parameters() if not n.startswith("head.")}
    sgd = optimizer.segmentation.param_groups[0]
    assert (sgd["momentum"], sgd["nesterov"], sgd["weight_decay"]) == (0.99, True, 3e-5)  # nnU-Net's SGD
    assert optimizer.head.param_groups[0]["weight_decay"] == HEAD_WEIGHT_DECAY
    # nnU-Net logs param_groups[0]["lr"]: that must be the segmentation network's rate
    assert optimizer.param_groups[0] is sgd and len(optimizer.param_groups) == 2


def test_poly_schedule_for_both() -> None:
    net = Toy()
    optimizer, scheduler = build_optimizer(net, net.head, initial_lr=0.01, head_lr=1e-3, weight_decay=0, max_steps=10)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 1e-3])
    scheduler.step(4)  # nnU-Net calls step(current_epoch) at every epoch start
    factor = (1 - 4 / 10) ** 0.9
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01 * factor, 1e-3 * factor])


def test_zero_grad_and_step_update_all_parameters() -> None:
    net = Toy()
    before = copy.deepcopy(net.state_dict())
    optimizer, _ = build_optimizer(net, net.head, initial_lr=0.01, head_lr=1e-3, weight_decay=0, max_steps=10)
    net.loss().backward()
    optimizer.step()
    assert all(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    optimizer.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_head_step_does_not_depend_on_the_loss_weight() -> None:
    """The reason for AdamW: lambda scales the head's gradient, not its step."""
    heads = []
    for cls_weight in (0.05, 1.0):
        net = Toy()
        optimizer, _ = build_optimizer(net, net.head, initial_lr=0.01, head_lr=1e-3, weight_decay=0, max_steps=10)
        net.loss(cls_weight).backward()  # one step: later ones see encoders changed by lambda differently
        optimizer.step()
        heads.append(net.head.weight.detach().clone())
    torch.testing.assert_close(heads[0], heads[1], rtol=1e-4, atol=1e-5)


def test_state_dict_round_trip() -> None:
    net = Toy()
    optimizer, _ = build_optimizer(net, net.head, initial_lr=0.01, head_lr=1e-3, weight_decay=0, max_steps=10)
    net.loss().backward()
    optimizer.step()
    state = optimizer.state_dict()
    assert set(state) == {"segmentation", "head"}

    fresh_net = Toy()
    fresh, _ = build_optimizer(fresh_net, fresh_net.head, initial_lr=0.5, head_lr=0.5, weight_decay=0, max_steps=10)
    fresh.load_state_dict(state)
    assert [g["lr"] for g in fresh.param_groups] == pytest.approx([0.01, 1e-3])
    head_state = next(iter(fresh.head.state.values()))
    assert int(head_state["step"]) == 1 and "exp_avg_sq" in head_state
    assert "momentum_buffer" in next(iter(fresh.segmentation.state.values()))


def test_plain_optimizer_state_is_refused() -> None:
    net = Toy()
    optimizer, _ = build_optimizer(net, net.head, initial_lr=0.01, head_lr=1e-3, weight_decay=0, max_steps=10)
    plain = torch.optim.SGD(net.parameters(), 0.01).state_dict()  # what stock nnU-Net checkpoints hold
    with pytest.raises(TrainError, match="not a multi-task one.*--force"):
        optimizer.load_state_dict(plain)


def test_is_what_nnunet_expects_of_an_optimizer() -> None:
    net = Toy()
    optimizer, scheduler = build_optimizer(net, net.head, initial_lr=0.01, head_lr=1e-3, weight_decay=0, max_steps=4)
    assert isinstance(optimizer, MultiTaskOptimizer)
    for epoch in range(4):  # nnU-Net's loop: scheduler.step(epoch), then zero_grad/backward/step
        scheduler.step(epoch)
        optimizer.zero_grad(set_to_none=True)
        net.loss().backward()
        optimizer.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - 3 / 4) ** 0.9)


def test_fused_optimizers_resume_unfused_state() -> None:
    """Optimizer states saved before both parts were fused still resume, fused."""
    net = Toy()
    optimizer, _ = build_optimizer(net, net.head, initial_lr=0.01, head_lr=1e-3, weight_decay=0, max_steps=10)
    assert optimizer.head.param_groups[0]["fused"] is True

    head_ids = {id(p) for p in net.head.parameters()}
    old = MultiTaskOptimizer(  # as build_optimizer made it up to pancseg's session-8 code
        torch.optim.SGD([p for p in net.parameters() if id(p) not in head_ids], 0.01, momentum=0.99, nesterov=True),
        torch.optim.AdamW(net.head.parameters(), 1e-3, weight_decay=HEAD_WEIGHT_DECAY),
    )
    net.loss().backward()
    old.step()
    resumed_net = copy.deepcopy(net)
    resumed, _ = build_optimizer(resumed_net, resumed_net.head, initial_lr=0.01, head_lr=1e-3, weight_decay=0,
                                 max_steps=10)
    resumed.load_state_dict(copy.deepcopy(old.state_dict()))  # as from a checkpoint file: no shared tensors
    for model, opt in ((net, old), (resumed_net, resumed)):
        opt.zero_grad()
        model.loss().backward()
        opt.step()
    torch.testing.assert_close(resumed_net.head.weight, net.head.weight)
    torch.testing.assert_close(resumed_net.encoder.weight, net.encoder.weight)
    assert all(g["fused"] for opt in resumed.optimizers for g in opt.param_groups)  # this machine's choice
    assert all(s["step"].dtype == torch.float32 for s in resumed.head.state.values())


def _nnunet_sgd(net: Toy) -> torch.optim.SGD:
    """nnU-Net's own SGD (unfused) over the same parameters, the reference for the fused one."""
    head_ids = {id(p) for p in net.head.parameters()}
    return torch.optim.SGD([p for p in net.parameters() if id(p) not in head_ids], 0.01, weight_decay=3e-5,
                           momentum=0.99, nesterov=True, foreach=False)


def test_fused_sgd_is_nnunets_update() -> None:
    """Zero momentum buffers, fused kernel: the same steps as nnU-Net's SGD, from the first one on."""
    net, reference = Toy(), Toy()
    optimizer, _ = build_optimizer(net, net.head, initial_lr=0.01, head_lr=1e-3, weight_decay=3e-5, max_steps=10)
    assert optimizer.segmentation.param_groups[0]["fused"] and optimizer.head.param_groups[0]["fused"]
    assert all(not s["momentum_buffer"].any() for s in optimizer.segmentation.state.values())
    sgd = _nnunet_sgd(reference)
    for _ in range(3):
        for model, opt in ((net, optimizer.segmentation), (reference, sgd)):
            opt.zero_grad()
            model.loss().backward()
            opt.step()
    torch.testing.assert_close(net.encoder.weight, reference.encoder.weight)
    torch.testing.assert_close(net.decoder.bias, reference.decoder.bias)


def test_skipped_first_step_leaves_no_momentum() -> None:
    """The gradient scaler skips a step whose gradients overflowed; when that is the first, the next
    one must still be nnU-Net's first step (the fused kernel alone would keep uninitialised buffers)."""
    net, reference = Toy(), Toy()
    optimizer, _ = build_optimizer(net, net.head, initial_lr=0.01, head_lr=1e-3, weight_decay=3e-5, max_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    hook = net.encoder.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    for _ in range(2):  # the first step overflows, the second does not
        optimizer.zero_grad()
        scaler.scale(net.loss()).backward()
        hook.remove()
        scaler.unscale_(optimizer.segmentation)
        scaler.step(optimizer.segmentation)
        scaler.update()
    sgd = _nnunet_sgd(reference)
    reference.loss().backward()
    sgd.step()
    torch.testing.assert_close(net.encoder.weight, reference.encoder.weight)
    assert scaler.get_scale() == 512.0
