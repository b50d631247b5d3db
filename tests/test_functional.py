"""Tests for kdistill.functional: hand-computed values, a naive float64 reference,
gradients, numerical stability, reductions and argument validation."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdistill.functional import (
    cross_entropy,
    kd_div,
    logit_mse,
    soft_cross_entropy,
    soft_targets,
    tang_interpolation,
)

LN3 = math.log(3.0)
TEMPERATURES = [1.0, 2.0, 4.0, 10.0]
PAIR_LOSSES = [kd_div, soft_cross_entropy, logit_mse, tang_interpolation]
TEMPERED_LOSSES = [kd_div, soft_cross_entropy, tang_interpolation]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waiting on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def call(fn, s, t, temperature=1.0, **kwargs):
    """Call a pair loss; logit_mse takes no temperature."""
    if fn is logit_mse:
        return fn(s, t, **kwargs)
    return fn(s, t, temperature=temperature, **kwargs)


def random_pair(n=5, c=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(n, c, generator=g, dtype=torch.float64)
    t = 3 * torch.randn(n, c, generator=g, dtype=torch.float64)
    return s.to(dtype), t.to(dtype)


# ---------------------------------------------------------------- naive float64 reference
def naive_softmax(z):
    e = torch.exp(z.double())
    return e / e.sum(dim=-1, keepdim=True)


def naive_kl(s, t, T):
    """Per-sample T^2 * sum_c p_t (log p_t - log p_s), literally."""
    p_s, p_t = naive_softmax(s / T), naive_softmax(t / T)
    return T**2 * (p_t * (torch.log(p_t) - torch.log(p_s))).sum(-1)


def naive_soft_ce(s, t, T):
    p_s, p_t = naive_softmax(s / T), naive_softmax(t / T)
    return T**2 * -(p_t * torch.log(p_s)).sum(-1)


def naive_entropy(t, T):
    p_t = naive_softmax(t / T)
    return -(p_t * torch.log(p_t)).sum(-1)


def naive_mse(s, t):
    return ((s.double() - t.double()) ** 2).sum(-1) / s.shape[-1]


def close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(
        actual.double(), torch.as_tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol
    )


# ---------------------------------------------------------------- hand-computed values
# Student [[0, ln 3]] -> softmax [1/4, 3/4]; teacher [[0, 0]] -> softmax [1/2, 1/2].
S_HAND = torch.tensor([[0.0, LN3]])
T_HAND = torch.tensor([[0.0, 0.0]])


def test_kd_div_by_hand():
    # KL(t || s) = 1/2 ln((1/2)/(1/4)) + 1/2 ln((1/2)/(3/4)) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    close(kd_div(S_HAND, T_HAND), 0.5 * math.log(4 / 3))
    # Swapped roles: KL([1/4, 3/4] || [1/2, 1/2]) = 1/4 ln(1/2) + 3/4 ln(3/2) = 3/4 ln 3 - ln 2
    close(kd_div(T_HAND, S_HAND), 0.75 * LN3 - math.log(2))


def test_kd_div_by_hand_at_temperature_2():
    # Logits [0, 2 ln 3] / T=2 = [0, ln 3], so the softmaxes are as above and the
    # result is T^2 * 1/2 ln(4/3) = 4 * 1/2 ln(4/3) = 2 ln(4/3).
    close(kd_div(2 * S_HAND, T_HAND, temperature=2.0), 2 * math.log(4 / 3))


def test_soft_cross_entropy_by_hand():
    # -(1/2 ln(1/4) + 1/2 ln(3/4)) = ln 4 - 1/2 ln 3
    # (= KL 1/2 ln(4/3) + teacher entropy ln 2)
    close(soft_cross_entropy(S_HAND, T_HAND), math.log(4) - 0.5 * LN3)
    # At T=2 with logits doubled: 4 * (ln 4 - 1/2 ln 3)
    close(soft_cross_entropy(2 * S_HAND, T_HAND, temperature=2.0), 4 * (math.log(4) - 0.5 * LN3))


def test_logit_mse_by_hand():
    # Differences [0, 2, 3] -> squares [0, 4, 9] -> mean over 3 classes = 13/3
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[1.0, 0.0, 0.0]])
    close(logit_mse(s, t), 13 / 3)
    # Second sample: differences [1, 1, 1] -> 1; batch mean = (13/3 + 1) / 2 = 8/3
    s2 = torch.cat([s, torch.ones(1, 3)])
    t2 = torch.cat([t, torch.zeros(1, 3)])
    close(logit_mse(s2, t2, reduction="none"), [13 / 3, 1.0])
    close(logit_mse(s2, t2), 8 / 3)


def test_tang_interpolation_by_hand():
    # alpha * KL + (1 - alpha) * MSE with KL = 1/2 ln(4/3) and MSE = (0^2 + (ln 3)^2) / 2
    expected = 0.25 * 0.5 * math.log(4 / 3) + 0.75 * LN3**2 / 2
    close(tang_interpolation(S_HAND, T_HAND, alpha=0.25), expected)


def test_soft_targets_by_hand():
    # softmax([0, ln 3]) = [1, 3] / 4; the same at T=2 for logits [0, 2 ln 3]
    close(soft_targets(S_HAND), [[0.25, 0.75]])
    close(soft_targets(2 * S_HAND, temperature=2.0), [[0.25, 0.75]])


def test_cross_entropy_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]; label 1 -> -ln(3/4)
    labels = torch.tensor([1])
    close(cross_entropy(S_HAND, labels), -math.log(0.75))
    # Smoothing 0.2 over 2 classes: target [0.1, 0.9] -> -(0.1 ln(1/4) + 0.9 ln(3/4))
    close(
        cross_entropy(S_HAND, labels, label_smoothing=0.2),
        -(0.1 * math.log(0.25) + 0.9 * math.log(0.75)),
    )


# ---------------------------------------------------------------- naive reference, random
@pytest.mark.parametrize("T", TEMPERATURES)
def test_against_naive_reference(T):
    s, t = random_pair()
    close(kd_div(s, t, T, reduction="none"), naive_kl(s, t, T))
    close(soft_cross_entropy(s, t, T, reduction="none"), naive_soft_ce(s, t, T))
    close(logit_mse(s, t, reduction="none"), naive_mse(s, t))
    close(
        tang_interpolation(s, t, T, alpha=0.3, reduction="none"),
        0.3 * naive_kl(s, t, T) + 0.7 * naive_mse(s, t),
    )
    close(soft_targets(t, T), naive_softmax(t / T))


@pytest.mark.parametrize("T", TEMPERATURES)
def test_kd_div_matches_torch_kl_div_batchmean(T):
    s, t = random_pair(seed=1)
    log_ps, log_pt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    expected = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * T**2
    close(kd_div(s, t, T), expected)


@pytest.mark.parametrize("T", TEMPERATURES)
def test_kd_div_is_t_squared_times_plain_kl(T):
    s, t = random_pair(seed=2)
    # Plain (unscaled) KL between the softened distributions, two independent ways.
    plain_naive = naive_kl(s, t, T) / T**2
    plain_t1 = kd_div(s / T, t / T, temperature=1.0, reduction="none")
    close(plain_t1, plain_naive)
    close(kd_div(s, t, T, reduction="none"), T**2 * plain_naive)
    close(kd_div(s, t, T, reduction="none"), T**2 * plain_t1)


@pytest.mark.parametrize("T", TEMPERATURES)
def test_identical_inputs(T):
    x, _ = random_pair(seed=3)
    close(kd_div(x, x, T, reduction="none"), torch.zeros(x.shape[0]))
    close(soft_cross_entropy(x, x, T, reduction="none"), T**2 * naive_entropy(x, T))
    close(logit_mse(x, x, reduction="none"), torch.zeros(x.shape[0]))


@pytest.mark.parametrize("T", TEMPERATURES)
def test_soft_ce_is_kd_div_plus_teacher_entropy_with_same_student_gradient(T):
    s, t = random_pair(seed=4)
    close(soft_cross_entropy(s, t, T, "none"), kd_div(s, t, T, "none") + T**2 * naive_entropy(t, T))
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    kd_div(s1, t, T).backward()
    soft_cross_entropy(s2, t, T).backward()
    close(s1.grad, s2.grad)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("fn", PAIR_LOSSES)
@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_wrt_student(fn, T, reduction):
    # float64 input is kept in float64 (upcast to at least fp32), so gradcheck is exact enough.
    s, t = random_pair(n=3, c=5, seed=5, dtype=torch.float64)
    s.requires_grad_()
    out = call(fn, s, t, T, reduction=reduction)
    assert out.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: call(fn, x, t, T, reduction=reduction), (s,))


# ---------------------------------------------------------------- stability and dtypes
@pytest.mark.parametrize("fn", PAIR_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1.0, 10.0])
def test_huge_logits_finite_and_fp32(fn, dtype, T):
    s = torch.tensor([[1e4, -1e4, 0.0]], dtype=dtype, requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0]], dtype=dtype)
    out = call(fn, s, t, T)
    assert out.dtype == torch.float32
    assert torch.isfinite(out)
    out.backward()
    assert s.grad.dtype == dtype
    assert torch.isfinite(s.grad).all()


def test_huge_logits_kd_value():
    # At T=1 the teacher is one-hot on class 1, where log p_s = -2e4 (up to exp(-1e4) terms),
    # so KL = 0 - (-2e4) = 2e4.
    s = torch.tensor([[1e4, -1e4, 0.0]])
    t = torch.tensor([[-1e4, 1e4, 0.0]])
    close(kd_div(s, t), 2e4, rtol=1e-6)


def test_masked_teacher_class_contributes_zero():
    # A teacher logit of -inf means p_t = 0 there; that class adds 0 (not nan), so the
    # result equals the naive KL summed over the other classes only.
    s, t = random_pair(n=2, c=4, seed=6)
    t[:, 1] = float("-inf")
    s.requires_grad_()
    for fn in (kd_div, soft_cross_entropy):
        out = fn(s, t, 2.0)
        assert torch.isfinite(out)
        (grad,) = torch.autograd.grad(out, s)
        assert torch.isfinite(grad).all()
    keep = [0, 2, 3]
    p_t, p_s = naive_softmax(t / 2.0)[:, keep], naive_softmax(s.detach() / 2.0)[:, keep]
    expected = 4 * (p_t * (torch.log(p_t) - torch.log(p_s))).sum(-1)
    close(kd_div(s, t, 2.0, "none"), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_fp32(dtype):
    s, t = random_pair(seed=7, dtype=dtype)
    assert soft_targets(t).dtype == torch.float32
    assert cross_entropy(s, torch.zeros(5, dtype=torch.long)).dtype == torch.float32
    # Same as computing on the fp32 upcast of the same (rounded) values.
    close(kd_div(s, t, 2.0), kd_div(s.float(), t.float(), 2.0))


# ---------------------------------------------------------------- reductions
@pytest.mark.parametrize("fn", PAIR_LOSSES)
def test_reductions(fn):
    s, t = random_pair(seed=8)
    none = call(fn, s, t, 2.0, reduction="none")
    assert none.shape == (5,)
    close(call(fn, s, t, 2.0, reduction="sum"), none.sum())
    close(call(fn, s, t, 2.0, reduction="mean"), none.mean())
    assert call(fn, s, t, 2.0).shape == ()


def test_cross_entropy_reductions():
    s, _ = random_pair(seed=9)
    labels = torch.tensor([0, 3, 6, 2, 2])
    none = cross_entropy(s, labels, reduction="none")
    assert none.shape == (5,)
    close(cross_entropy(s, labels, reduction="sum"), none.sum())
    close(cross_entropy(s, labels), none.mean())


# ---------------------------------------------------------------- tang endpoints, cross_entropy
@pytest.mark.parametrize("T", TEMPERATURES)
def test_tang_endpoints(T):
    s, t = random_pair(seed=10)
    close(tang_interpolation(s, t, T, alpha=1.0), kd_div(s, t, T))
    close(tang_interpolation(s, t, T, alpha=0.0), logit_mse(s, t))


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(smoothing, reduction):
    s, _ = random_pair(seed=11)
    labels = torch.tensor([1, 0, 6, 3, 3])
    expected = F.cross_entropy(s, labels, label_smoothing=smoothing, reduction=reduction)
    close(cross_entropy(s, labels, label_smoothing=smoothing, reduction=reduction), expected)
    # bf16 logits are upcast, then handled exactly as fp32 logits of the same values.
    sb = s.bfloat16()
    expected_b = F.cross_entropy(sb.float(), labels, label_smoothing=smoothing, reduction=reduction)
    close(cross_entropy(sb, labels, label_smoothing=smoothing, reduction=reduction), expected_b)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("fn", TEMPERED_LOSSES)
@pytest.mark.parametrize("T", [0.0, -2.0, float("nan")])
def test_bad_temperature(fn, T):
    s, t = random_pair()
    with pytest.raises(ValueError, match=f"temperature.*{T}"):
        fn(s, t, temperature=T)


def test_bad_temperature_soft_targets():
    with pytest.raises(ValueError, match="temperature.*0.0"):
        soft_targets(T_HAND, temperature=0.0)


@pytest.mark.parametrize("fn", PAIR_LOSSES)
def test_shape_mismatch(fn):
    s = torch.zeros(2, 3)
    t = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        call(fn, s, t)


@pytest.mark.parametrize("alpha", [1.5, -0.1])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match=f"alpha.*{alpha}"):
        tang_interpolation(S_HAND, T_HAND, alpha=alpha)


@pytest.mark.parametrize("fn", PAIR_LOSSES)
def test_unknown_reduction(fn):
    with pytest.raises(ValueError, match="batchmean"):
        call(fn, S_HAND, T_HAND, reduction="batchmean")


def test_cross_entropy_validation():
    labels = torch.tensor([1])
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(S_HAND, labels, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing.*1.0"):
        cross_entropy(S_HAND, labels, label_smoothing=1.0)
    with pytest.raises(ValueError, match="labels shape"):
        cross_entropy(S_HAND, torch.tensor([1, 0]))
