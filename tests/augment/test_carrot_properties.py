"""Property tests of CARROT's guarantees: exact Kset margins, the δ chance constraint, gating,
no NaN — on random and adversarial geometries; and the seed's bound failing the same test.

The δ tests count violations over many independent noise draws of fixed rows (seeded, so
deterministic) and compare each count with the binomial(n, δ) upper quantile at a family-wise
error of :data:`FAMILY_ERROR` (Bonferroni over every comparison of the δ tests); with
:data:`DRAWS` draws per row a true rate of 2δ fails that bound (see
``test_the_delta_bounds_fail_a_rate_of_twice_delta``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from binomial_bounds import binomial_power_miss, binomial_upper
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.augment.carrot import CarrotAugment, CarrotConfig, carrot_augment, carrot_loss
from pipeline.augment.nuisance import centered_weight, nearest_classes, top_competitors


def _load_seed_reference():
    """benchmarks/ is not an installed package: load the seed transcription from its file."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "seed_reference.py"
    spec = importlib.util.spec_from_file_location("carrot_seed_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SeedCarrotFeatureAug = _load_seed_reference().SeedCarrotFeatureAug

KINDS = ("random", "collinear", "duplicate", "tiny_margin", "zero_weight", "zero_z", "huge")


def make_problem(kind: str, *, b: int, d: int, c: int, seed: int, dtype=torch.float32):
    """Features z (B, D), labels y (B,), head weight W (C, D), logits (B, C) for one geometry."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    if kind == "collinear":  # all weights near one line: competitor differences near-collinear
        t = torch.randn(c, 1, generator=g)
        w = t * torch.randn(d, generator=g) + 1e-4 * torch.randn(c, d, generator=g)
        ends = torch.stack([t.argmax(), t.argmin()])  # only the two ends of a line can win
        y = ends[torch.randint(0, 2, (b,), generator=g)]
    elif kind == "duplicate" and c >= 5:  # classes 0 and 1 share one weight, close to class 2
        w[0] = w[1] = w[2] + 0.5 * torch.randn(d, generator=g)
        y = torch.randint(2, c, (b,), generator=g)
        y[: b // 2] = 2  # their competitor sets hold the duplicates: a rank-deficient Gram
    z = 2.0 * w[y] + 0.3 * torch.randn(b, d, generator=g)
    if kind == "tiny_margin":
        z = 1e-3 * z
    elif kind == "zero_weight":
        w = torch.zeros(c, d)
    elif kind == "zero_z":
        z = torch.zeros(b, d)
    elif kind == "huge":
        w, z = 1e4 * w, 1e3 * z
    z = z.to(dtype)
    return z, y, w, z.float() @ w.T


def margins64(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, C) float64 margins l_y − l_c of the exact values, +inf at y."""
    logits = z.double() @ w.double().T
    margin = logits.gather(1, y[:, None]) - logits
    return margin.scatter(1, y[:, None], float("inf"))


def expected_kset(cfg: CarrotConfig, y, w, logits, k: int) -> torch.Tensor:
    if cfg.mode == "sample":
        return top_competitors(logits, y, k)
    wc = centered_weight(w)
    return nearest_classes(wc @ wc.T, k)[y]


@st.composite
def problems(draw):
    c = draw(st.integers(2, 24))
    return dict(
        kind=draw(st.sampled_from(KINDS)),
        b=draw(st.integers(1, 10)),
        d=draw(st.integers(2, 20)),
        c=c,
        topk=draw(st.integers(1, c + 1)),
        mode=draw(st.sampled_from(["sample", "class"])),
        gamma=draw(st.sampled_from([0.0, 0.5])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        seed=draw(st.integers(0, 2**31 - 1)),
        copies=draw(st.integers(1, 3)),
        alpha_max=draw(st.sampled_from([None, 0.5])),
    )


@settings(deadline=None, max_examples=150, derandomize=True)
@given(problems())
def test_kset_margins_exact_gating_and_finiteness(p):
    z, y, w, logits = make_problem(
        p["kind"], b=p["b"], d=p["d"], c=p["c"], seed=p["seed"], dtype=p["dtype"]
    )
    cfg = CarrotConfig(
        topk=p["topk"],
        mode=p["mode"],
        gamma=p["gamma"],
        aug_per_sample=p["copies"],
        alpha_max=p["alpha_max"],
    )
    out = carrot_augment(z, y, logits, w, cfg, generator=torch.Generator().manual_seed(p["seed"]))

    # finite, non-negative, no NaN anywhere; shapes and bookkeeping consistent
    assert torch.isfinite(out.alpha).all() and (out.alpha >= 0).all()
    assert torch.isfinite(out.z.float()).all()
    assert all(torch.isfinite(v).all() for v in out.diagnostics.values())
    augmented = torch.nonzero(out.alpha > 0).squeeze(1)
    assert out.z.shape == (augmented.numel() * p["copies"], p["d"]) and out.z.dtype == z.dtype
    assert torch.equal(out.source, augmented.repeat(p["copies"]))
    assert torch.equal(out.y, y[out.source])

    # rows with any margin <= gamma are never augmented
    m = margins64(z, y, w)
    assert not ((m <= p["gamma"]).any(dim=1) & (out.alpha > 0)).any()

    # Kset margins are unchanged, up to 1e-4·(1+|m|) plus the rounding of z̃ to its dtype
    if out.z.shape[0]:
        k = min(p["topk"], p["c"] - 1)
        kset = expected_kset(cfg, y, w, logits, k)[out.source]  # (M, K)
        before = m[out.source].gather(1, kset)
        after = margins64(out.z, out.y, w).gather(1, kset)
        d_abs = (w.double()[out.y][:, None, :] - w.double()[kset]).abs()  # (M, K, D)
        rounding = 2 * torch.finfo(z.dtype).eps * (d_abs * out.z.double().abs()[:, None, :]).sum(-1)
        assert ((after - before).abs() <= 1e-4 * (1 + before.abs()) + rounding).all()


def violation_rate(
    z_aug: torch.Tensor, y_aug: torch.Tensor, w: torch.Tensor, gamma: float
) -> torch.Tensor:
    """(M,) float64: 1 where some margin of the augmented row is below gamma."""
    return (margins64(z_aug, y_aug, w) < gamma).any(dim=1).double()


SAFETY_CASES = [
    # (kind, B, D, C, topk, mode)
    ("random", 8, 32, 40, 5, "sample"),
    ("random", 8, 24, 120, 4, "class"),  # C ≫ K
    ("random", 6, 16, 12, 11, "sample"),  # K = C − 1: no outside class, only the cap
    ("collinear", 8, 16, 20, 3, "sample"),
    ("duplicate", 8, 16, 20, 4, "sample"),
    ("tiny_margin", 8, 32, 40, 5, "class"),
    ("random", 6, 4, 30, 10, "sample"),  # D < K: the competitors span everything
]
DELTA = 0.05
DRAWS = 4000  # noise draws per row: a rate of 2δ fails the per-row bound (tested below)
BIAS_ROWS, BIAS_MODES = 8, ("sample", "class")
FAMILY_ERROR = 1e-6  # P(any δ comparison of this file fails | every true rate ≤ δ)
# one count per row that can be augmented, plus the pooled count, per case (Bonferroni)
COMPARISONS = sum(b + 1 for _, b, *_ in SAFETY_CASES) + len(BIAS_MODES) * (BIAS_ROWS + 1)
ALPHA = FAMILY_ERROR / COMPARISONS


def assert_violations_within_delta(bad: torch.Tensor, draws: int, delta: float) -> None:
    """``bad`` (draws·R,) 0/1, copy-major (row r's draws at r, R + r, ...): each row's count of
    violations over its ``draws`` independent draws, and the pooled count, are at most the
    binomial(n, δ) upper quantile at level :data:`ALPHA`."""
    per_row = bad.view(draws, -1).sum(dim=0)
    row_limit = binomial_upper(draws, delta, ALPHA)
    worst = int(per_row.argmax())
    assert int(per_row[worst]) <= row_limit, (
        f"row {worst}: {int(per_row[worst])} violations in {draws} draws "
        f"(rate {float(per_row[worst]) / draws:.4f}) > binomial bound {row_limit} for δ={delta}"
    )
    pooled_limit = binomial_upper(bad.numel(), delta, ALPHA)
    assert int(bad.sum()) <= pooled_limit, (int(bad.sum()), bad.numel(), pooled_limit)


def test_the_delta_bounds_fail_a_rate_of_twice_delta():
    """The counts below can fail: a row whose true violation rate is 2δ passes its bound with
    probability < 1e-9, and the bound sits well below 2δ·n (it is not a loose tolerance)."""
    assert binomial_power_miss(DRAWS, DELTA, 2 * DELTA, ALPHA) < 1e-9
    assert binomial_upper(DRAWS, DELTA, ALPHA) < 1.5 * DELTA * DRAWS
    assert binomial_power_miss(DRAWS * BIAS_ROWS, DELTA, 1.5 * DELTA, ALPHA) < 1e-9  # pooled
    g = torch.Generator().manual_seed(0)
    at_delta = (torch.rand(DRAWS * BIAS_ROWS, generator=g) < DELTA).double()
    assert_violations_within_delta(at_delta, DRAWS, DELTA)  # a rate of exactly δ passes
    one_row_twice = at_delta.clone().view(DRAWS, BIAS_ROWS)
    one_row_twice[:, 3] = (torch.rand(DRAWS, generator=g) < 2 * DELTA).double()
    with pytest.raises(AssertionError, match="row 3"):
        assert_violations_within_delta(one_row_twice.flatten(), DRAWS, DELTA)


@pytest.mark.parametrize(("kind", "b", "d", "c", "topk", "mode"), SAFETY_CASES)
def test_violation_rate_within_delta(kind, b, d, c, topk, mode):
    z, y, w, logits = make_problem(kind, b=b, d=d, c=c, seed=7)
    cfg = CarrotConfig(topk=topk, mode=mode, delta=DELTA, aug_per_sample=DRAWS)
    out = carrot_augment(z, y, logits, w, cfg, generator=torch.Generator().manual_seed(1))
    if d < min(topk, c - 1):
        assert out.z.shape[0] == 0  # no nuisance subspace left: nothing augmented
        return
    assert out.z.shape[0] > 0, "the geometry should leave some rows eligible"
    assert out.z.shape[0] <= DRAWS * b  # at most b rows: the Bonferroni count holds
    bad = violation_rate(out.z, out.y, w, cfg.gamma)
    assert_violations_within_delta(bad, DRAWS, DELTA)
    assert float(out.diagnostics["violation_rate"]) == pytest.approx(float(bad.mean()), abs=1e-6)


@pytest.mark.parametrize(
    ("kind", "b", "d", "c", "topk", "mode"), SAFETY_CASES[:2] + SAFETY_CASES[5:6]
)
def test_seed_bound_fails_the_same_safety_test(kind, b, d, c, topk, mode):
    """The seed's bound (top-K classes, clamp eps) on the same geometry: far above δ."""
    z, y, w, logits = make_problem(kind, b=b, d=d, c=c, seed=7)
    seed = SeedCarrotFeatureAug(topk=topk, delta=0.05, aug_per_sample=50)
    torch.manual_seed(0)
    z_aug, y_aug = seed(z, y, logits, w, generator=torch.Generator().manual_seed(1))
    assert z_aug is not None
    assert violation_rate(z_aug, y_aug, w, 0.0).mean() > 0.5


# --- class mode with a cached (stale) geometry, while the head trains ------------------------


@st.composite
def trainings(draw):
    return dict(
        c=draw(st.integers(16, 24)),
        d=draw(st.integers(12, 20)),  # D > K = 10 (the default topk): a nuisance subspace exists
        lr=draw(st.sampled_from([1.0, 3.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(deadline=None, max_examples=4, derandomize=True)
@given(trainings())
def test_class_mode_keeps_the_guarantee_for_the_current_weight_while_training(p):
    """A LayerNorm+Linear head trained by SGD (large lr: the weight moves every step) through
    ``CarrotAugment`` in class mode at its defaults (refresh=50: the geometry is up to 49 steps
    old). At every step the augmented rows must keep P(any margin of the CURRENT weight < γ)
    ≤ δ: the violation count is below the binomial upper quantile (Bonferroni over steps)."""
    c, d, steps, draws, n = p["c"], p["d"], 60, 50, 64
    g = torch.Generator().manual_seed(p["seed"])
    means = torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    x = 3.0 + means[y] + torch.randn(n, d, generator=g)
    ln, head = torch.nn.LayerNorm(d), torch.nn.Linear(d, c, bias=False)
    with torch.no_grad():
        head.weight.copy_(0.3 * torch.randn(c, d, generator=g))
    cfg = CarrotConfig(mode="class", aug_per_sample=draws)
    assert cfg.refresh == 50 and cfg.topk == 10
    aug = CarrotAugment(cfg)
    opt = torch.optim.SGD([*ln.parameters(), *head.parameters()], lr=p["lr"])
    noise = torch.Generator().manual_seed(p["seed"] + 1)
    augmented_steps = 0
    for step in range(steps):
        z = ln(x)
        logits = head(z)
        out = aug(z, y, logits.detach(), head.weight, generator=noise)
        if out.z.shape[0]:
            augmented_steps += 1
            bad = violation_rate(out.z.detach(), out.y, head.weight.detach(), cfg.gamma)
            limit = binomial_upper(bad.numel(), cfg.delta, 1e-3 / steps)
            assert int(bad.sum()) <= limit, (step, float(bad.mean()), limit / bad.numel())
        loss = carrot_loss(head.weight, z, y, out, cfg.aug_weight, logits=logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert aug.refresh_count == 2  # one refresh at step 0, one at step 50
    assert augmented_steps > steps // 2, "the case must exercise the stale geometry"


# --- heads with a bias: logits W z + b ---------------------------------------------------------


def _biased_margins(z, y, w, b):
    logits = z.double() @ w.double().T + b.double()
    margin = logits.gather(1, y[:, None]) - logits
    return margin.scatter(1, y[:, None], float("inf"))


@pytest.mark.parametrize("mode", ["sample", "class"])
def test_the_guarantee_holds_for_heads_with_a_bias(mode):
    """A head ``W z + b`` (the probe's heads have a bias): passing ``b`` keeps Kset margins exact
    and the violation rate ≤ δ against the biased margins; ignoring it breaks the guarantee."""
    assert mode in BIAS_MODES
    z, y, w, _ = make_problem("random", b=BIAS_ROWS, d=32, c=40, seed=11)
    # the bias takes 70 % of each row's smallest margin away (true classes lowered)
    smallest = margins64(z, y, w).min(dim=1).values
    bias = torch.zeros(40)
    bias[y] = -0.7 * smallest.float()
    logits = z @ w.T + bias
    cfg = CarrotConfig(topk=5, mode=mode, delta=DELTA, aug_per_sample=DRAWS)
    out = carrot_augment(
        z, y, logits, w, cfg, generator=torch.Generator().manual_seed(1), bias=bias
    )
    assert out.z.shape[0] > 0
    m = _biased_margins(z, y, w, bias)
    assert not ((m <= 0).any(dim=1) & (out.alpha > 0)).any()  # gating uses the biased margins
    after = _biased_margins(out.z, out.y, w, bias)
    kset = expected_kset(cfg, y, w, logits, 5)[out.source]
    before = m[out.source].gather(1, kset)
    assert ((after.gather(1, kset) - before).abs() <= 1e-4 * (1 + before.abs())).all()
    bad = (after < 0).any(dim=1).double()
    assert_violations_within_delta(bad, DRAWS, DELTA)
    assert out.diagnostics["violation_rate"] == pytest.approx(float(bad.mean()), abs=1e-6)
    blind = carrot_augment(z, y, logits, w, cfg, generator=torch.Generator().manual_seed(1))
    blind_bad = (_biased_margins(blind.z, blind.y, w, bias) < 0).any(dim=1).double().mean()
    assert blind_bad > 2 * DELTA  # the bias matters: without it the noise is far too large
