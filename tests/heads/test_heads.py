"""HeadBank: fused forward/backward, per-head gradient isolation, head groups, grid as data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.augment import GaussianSettings, MixupSettings
from pipeline.errors import InputError
from pipeline.heads.bank import Head, HeadBank, HeadGrid, HeadSpec, _BankLogits, _Workspace


def _perturbed_bank(H: int, D: int, C: int, seed: int = 0) -> HeadBank:
    bank = HeadBank(H, D, C, seeds=range(seed, seed + H))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # move LN affine away from (1, 0) so it matters
        bank.ln_weight.add_(0.3 * torch.randn(bank.ln_weight.shape, generator=g))
        bank.ln_bias.add_(0.3 * torch.randn(bank.ln_bias.shape, generator=g))
        bank.bias.add_(0.3 * torch.randn(bank.bias.shape, generator=g))
    return bank


@settings(deadline=None, max_examples=25)
@given(
    H=st.integers(1, 5),
    D=st.integers(1, 12),
    C=st.integers(2, 7),
    B=st.integers(1, 9),
    seed=st.integers(0, 1000),
)
def test_bank_logits_equal_single_heads(H, D, C, B, seed):
    bank = _perturbed_bank(H, D, C, seed)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(seed)) * 3 + 1
    logits = bank(x)
    assert logits.shape == (H, B, C)
    for h in range(H):
        torch.testing.assert_close(logits[h], bank.head(h)(x), rtol=1e-5, atol=1e-5)


def test_fused_backward_matches_numerical_gradient():
    g = torch.Generator().manual_seed(0)
    H, C, D, B = 3, 4, 5, 6
    args = [
        torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(H, C, D, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(H, D, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(H, D, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(H, C, generator=g, dtype=torch.float64, requires_grad=True),
    ]
    assert torch.autograd.gradcheck(lambda *a: _BankLogits.apply(*a, None), args)
    ws = _Workspace()  # with the reusable scratch buffers
    assert torch.autograd.gradcheck(lambda *a: _BankLogits.apply(*a, ws), args)


def test_fused_backward_matches_plain_autograd():
    H, C, D, B = 4, 6, 8, 10
    bank = _perturbed_bank(H, D, C)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(2))
    bank(x).log_softmax(-1).gather(-1, y.view(1, -1, 1).expand(H, -1, 1)).sum().backward()
    for h in range(H):
        head = bank.head(h)
        head(x).log_softmax(-1).gather(-1, y[:, None]).sum().backward()
        _assert_head_grads(bank, h, head)


def _assert_head_grads(bank: HeadBank, h: int, head: Head) -> None:
    """Head ``h``'s slices of the stacked gradients equal the single head's gradients."""
    pairs = [
        (bank.weight, head.fc.weight),
        (bank.bias, head.fc.bias),
        (bank.ln_weight, head.norm.weight),
        (bank.ln_bias, head.norm.bias),
    ]
    for stacked, single in pairs:
        torch.testing.assert_close(stacked.grad[h], single.grad, rtol=1e-5, atol=1e-6)


def test_gradients_isolate_per_head():
    H, C, D = 4, 5, 6
    bank = _perturbed_bank(H, D, C)
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(3))
    y = torch.arange(7) % C
    h0 = 2
    F.cross_entropy(bank(x)[h0], y).backward()
    for h in range(H):
        total = sum(float(p.grad[h].abs().sum()) for p in bank.parameters())
        if h == h0:
            assert total > 0
        else:
            assert total == 0.0


def test_gradients_accumulate_across_backward_calls():
    bank = _perturbed_bank(3, 4, 3)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    bank(x).sum().backward()
    first = bank.weight.grad.clone()
    bank(x).sum().backward()  # no zero_grad: gradients add up, as in plain PyTorch
    torch.testing.assert_close(bank.weight.grad, 2 * first)


def test_head_state_roundtrip_and_extraction():
    bank = _perturbed_bank(3, 6, 4)
    state = bank.head_state(2)
    head = bank.head(2)
    assert isinstance(head, Head) and head.dim == 6 and head.num_classes == 4
    torch.testing.assert_close(head.fc.weight, bank.weight[2])
    with torch.no_grad():
        bank.weight.zero_()
    bank.load_head_state(2, state)
    torch.testing.assert_close(bank.weight[2], state["fc.weight"])
    assert float(bank.weight[0].detach().abs().sum()) == 0.0


def test_freezing_the_layer_norm_leaves_it_out_of_the_parameters_and_the_gradient():
    bank = _perturbed_bank(2, 4, 3)
    bank.freeze_layer_norm()
    assert list(bank.trainable()) == ["weight", "bias"]
    gamma = bank.ln_weight.detach().clone()
    z = bank.group_features(bank.normalize(torch.randn(5, 4)), slice(1, 2))
    (bank(torch.randn(5, 4)).sum() + z.sum()).backward()
    assert bank.ln_weight.grad is None and bank.ln_bias.grad is None
    torch.testing.assert_close(bank.ln_weight.detach(), gamma)
    bank.freeze_layer_norm(False)
    assert list(bank.trainable()) == ["weight", "bias", "ln_weight", "ln_bias"]


def test_shared_frozen_affine_path_matches_the_folded_one():
    """With every head's LayerNorm affine frozen and equal, ``head_logits`` normalizes the rows
    once (z Wᵀ + c): the same logits and weight/bias gradients as the folded x̂ (W⊙γ)ᵀ + W β + c
    path; changing one head's affine in place sends it back to the folded path."""
    H, C, D, B = 3, 5, 7, 9
    bank = _perturbed_bank(H, D, C)
    with torch.no_grad():
        bank.ln_weight.copy_(bank.ln_weight[:1].expand(H, D))
        bank.ln_bias.copy_(bank.ln_bias[:1].expand(H, D))
    bank.freeze_layer_norm()
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(5)) * 2 + 1
    y = torch.arange(B) % C
    xhat = bank.normalize(x)
    folded = _BankLogits.apply(xhat, bank.weight, bank.ln_weight, bank.ln_bias, bank.bias, None)
    F.cross_entropy(folded.view(B * H, C), y.repeat_interleave(H)).backward()
    expected = {n: getattr(bank, n).grad.clone() for n in ("weight", "bias")}
    bank.zero_grad()
    assert bank._shared_affine()
    logits = bank.head_logits(xhat)
    torch.testing.assert_close(logits, folded.view(B, H, C), rtol=1e-5, atol=1e-5)
    F.cross_entropy(logits.view(B * H, C), y.repeat_interleave(H)).backward()
    for name, grad in expected.items():
        torch.testing.assert_close(getattr(bank, name).grad, grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        bank.ln_weight[1].mul_(2.0)  # one head's affine differs now
    assert not bank._shared_affine()
    for h in range(H):
        torch.testing.assert_close(bank(x)[h], bank.head(h)(x), rtol=1e-5, atol=1e-5)


def test_init_is_seeded_per_head():
    a = HeadBank(2, 8, 3, seeds=[5, 6])
    b = HeadBank(1, 8, 3, seeds=[6])
    torch.testing.assert_close(a.weight[1], b.weight[0])
    assert not torch.equal(a.weight[0], a.weight[1])


def test_bank_subset_logits_by_slice():
    bank = _perturbed_bank(5, 6, 3)
    xhat = bank.normalize(torch.randn(4, 6))
    torch.testing.assert_close(bank.head_logits(xhat, slice(1, 4)), bank.head_logits(xhat)[:, 1:4])


def test_grid_from_lists_is_a_product_grouped_by_augmentation():
    grid = HeadGrid.from_lists(
        lrs=[1e-3, 1e-2],
        weight_decays=[0.0, 0.1, 1.0],
        augmentations=[("none", None), ("gaussian", GaussianSettings(sigma=0.2))],
    )
    assert len(grid) == 12
    groups = grid.groups()
    assert list(groups) == [("none", None), ("gaussian", GaussianSettings(sigma=0.2))]
    assert groups[("gaussian", GaussianSettings(sigma=0.2))] == list(range(6, 12))
    assert {s.lr for s in grid} == {1e-3, 1e-2}


def test_spec_dict_roundtrip_rebuilds_settings():
    spec = HeadSpec(lr=0.01, weight_decay=0.1, aug="mixup", aug_settings=MixupSettings(alpha=0.4))
    again = HeadSpec.from_dict(spec.to_dict())
    assert again == spec
    assert isinstance(again.aug_settings, MixupSettings)
    assert "aug=mixup" in spec.name


@pytest.mark.parametrize(
    "kwargs", [{"lr": 0.0}, {"lr": 1e-3, "weight_decay": -1.0}, {"label_smoothing": 1.0}]
)
def test_bad_spec_is_an_input_error(kwargs):
    with pytest.raises(InputError):
        HeadSpec(**kwargs)


def test_bank_rejects_bad_shapes():
    with pytest.raises(InputError):
        HeadBank(0, 4, 3)
    with pytest.raises(InputError):
        HeadBank(2, 4, 3, seeds=[1])


@pytest.mark.parametrize("group_first", [False, True])
@pytest.mark.parametrize("heads", [slice(1, 3), torch.tensor([2, 0])])
def test_group_path_and_fused_path_gradients_add_up(group_first, heads):
    """The group path (per-head rows through a few heads, as for CARROT rows) and the fused
    path meet in one stacked gradient; heads outside the group get none from the group path."""
    H, C, D = 4, 4, 5
    bank = _perturbed_bank(H, D, C)
    g = torch.Generator().manual_seed(6)
    members = list(range(H))[heads] if isinstance(heads, slice) else heads.tolist()
    x = torch.randn(6, D, generator=g)
    x2 = torch.randn(len(members), 4, D, generator=g)  # each member's own rows
    y, y2 = torch.arange(6) % C, torch.arange(4) % C
    fused = F.cross_entropy(bank(x).reshape(-1, C), y.repeat(H), reduction="sum")
    z = bank.group_features(bank.normalize(x2), heads)  # (h, 4, D)
    la = bank.group_logits(z, heads)  # (h, 4, C)
    extra = F.cross_entropy(la.reshape(-1, C), y2.repeat(len(members)), reduction="sum")
    (extra + fused if group_first else fused + extra).backward()
    for h in range(H):
        head = bank.head(h)
        loss = F.cross_entropy(head(x), y, reduction="sum")
        if h in members:
            loss = loss + F.cross_entropy(head(x2[members.index(h)]), y2, reduction="sum")
        loss.backward()
        _assert_head_grads(bank, h, head)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "to"])
def test_copies_train_on_their_own(how):
    import copy
    import pickle

    from pipeline.heads.optim import BankOptimizer

    bank = _perturbed_bank(2, 4, 3)
    if how == "deepcopy":
        other = copy.deepcopy(bank)
    elif how == "pickle":
        other = pickle.loads(pickle.dumps(bank))
    else:
        other = bank.to(torch.float64).to(torch.float32)
    before = bank.weight.detach().clone()
    opt = BankOptimizer(other, [HeadSpec(lr=1.0)] * 2, optimizer="sgd", momentum=0.0)
    other(torch.randn(5, 4)).sum().backward()
    snapshot = other.weight.detach().clone()
    opt.step()
    assert not torch.equal(other.weight.detach(), snapshot)  # the copy's stacked params moved
    if how != "to":
        torch.testing.assert_close(bank.weight.detach(), before)  # the original did not
