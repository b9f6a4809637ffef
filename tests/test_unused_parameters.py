"""Parameters the loss does not reach on some rank: the trainer gives them zero gradients (ZeRO 0-2) or names them
(ZeRO-3), instead of DeepSpeed's mismatched reductions (gloo: "Received data size doesn't match", NCCL: a hang)."""
import pytest
import torch
from torch import nn

from infra.unused_parameters import UnusedParameterError, UnusedParameterGuard, reached_parameters
from run_helpers import logged_losses
from test_trainer import _run


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.token = nn.Parameter(torch.ones(3))
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, x, use_b: bool):
        y = self.a(x)
        return (self.b(y) + self.token if use_b else y).pow(2).mean()


def test_reached_parameters_follow_the_graph():
    model = TwoBranches()
    x = torch.randn(2, 3)
    assert reached_parameters(model(x, True)) == {id(p) for p in (model.a.weight, model.a.bias, model.b.weight,
                                                                  model.b.bias, model.token)}
    assert reached_parameters(model(x, False)) == {id(model.a.weight), id(model.a.bias)}


def test_guard_gives_unreached_parameters_zero_gradients_and_leaves_the_rest():
    model = TwoBranches()
    x = torch.randn(2, 3)
    model(x, False).backward()
    plain = model.a.weight.grad.clone()
    assert model.b.weight.grad is None  # what made the ranks' reductions differ
    model.zero_grad(set_to_none=True)
    guard = UnusedParameterGuard(model, "model", zero_stage=2)
    assert [name for name, _ in guard.unreached(model(x, False))] == ["token", "b.weight", "b.bias"]
    loss = guard(model(x, False))
    loss.backward()
    torch.testing.assert_close(model.a.weight.grad, plain, rtol=0, atol=0)
    for p in (model.b.weight, model.b.bias, model.token):
        assert p.grad is not None and not p.grad.any()
    assert model.frozen.grad is None
    used = model(x, True)
    assert guard(used) is used  # nothing to add when everything is reached


def test_zero3_guard_names_the_unreached_parameters():
    model = TwoBranches()
    guard = UnusedParameterGuard(model, "dit", zero_stage=3, rank=1)
    with pytest.raises(UnusedParameterError, match=r"engine 'dit' on rank 1: .* 3 trainable parameter\(s\) "
                                                   r"\(token, b\.weight, b\.bias\).*ZeRO-3"):
        guard(model(torch.randn(2, 3), False))


def test_two_ranks_train_when_one_rank_never_uses_a_parameter(tmp_path):
    """Rank 1 of 2 reads the odd global batches only, which skip the toy's branch parameter (ZeRO-2; ZeRO-1 shares
    its code path in DeepSpeed, and the VAE's data-parallel tests run both)."""
    _run(tmp_path / "run", "deepspeed.zero_stage=2", "branch_on_even_batches=true", nproc=2)
    losses = logged_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1]
