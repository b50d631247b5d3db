"""Feature and relation methods against RepDistiller's code (AT, SP, RKD, PKT, CC, FSP, NST).

The `official_*` functions are RepDistiller's computations (distiller_zoo/*.py), rewritten here from
reading them; ours must give the same values within 1e-5 relative, on maps of equal and of different
sizes, and stay finite on awkward inputs.
"""

import pytest
import torch
import torch.nn.functional as F

from kdistill import functional as KF


def official_at(fs, ft, p=2):
    def at(f):
        return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))

    sh, th = fs.shape[2], ft.shape[2]
    if sh > th:
        fs = F.adaptive_avg_pool2d(fs, (th, th))
    elif sh < th:
        ft = F.adaptive_avg_pool2d(ft, (sh, sh))
    return (at(fs) - at(ft)).pow(2).mean()


def official_sp(fs, ft):
    b = fs.shape[0]
    fs, ft = fs.view(b, -1), ft.view(b, -1)
    gs, gt = F.normalize(torch.mm(fs, fs.t())), F.normalize(torch.mm(ft, ft.t()))
    diff = gt - gs
    return (diff * diff).view(-1, 1).sum(0) / (b * b)


def official_pdist(e, eps=1e-12):
    square = e.pow(2).sum(dim=1)
    res = (square.unsqueeze(1) + square.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt().clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def official_rkd(fs, ft):
    s, t = fs.view(fs.shape[0], -1), ft.view(ft.shape[0], -1)
    t_d = official_pdist(t)
    t_d = t_d / t_d[t_d > 0].mean()
    d = official_pdist(s)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    td = t.unsqueeze(0) - t.unsqueeze(1)
    t_angle = torch.bmm(F.normalize(td, p=2, dim=2), F.normalize(td, p=2, dim=2).transpose(1, 2)).view(-1)
    sd = s.unsqueeze(0) - s.unsqueeze(1)
    s_angle = torch.bmm(F.normalize(sd, p=2, dim=2), F.normalize(sd, p=2, dim=2).transpose(1, 2)).view(-1)
    return loss_d, F.smooth_l1_loss(s_angle, t_angle)


def official_pkt(out, target, eps=1e-7):
    out = out / (torch.sqrt(torch.sum(out**2, dim=1, keepdim=True)) + eps)
    target = target / (torch.sqrt(torch.sum(target**2, dim=1, keepdim=True)) + eps)
    ms, ts = (torch.mm(out, out.t()) + 1) / 2, (torch.mm(target, target.t()) + 1) / 2
    ms, ts = ms / ms.sum(dim=1, keepdim=True), ts / ts.sum(dim=1, keepdim=True)
    return torch.mean(ts * torch.log((ts + eps) / (ms + eps)))


def official_cc(fs, ft):
    delta = torch.abs(fs - ft)
    return torch.mean((delta[:-1] * delta[1:]).sum(1))


def official_fsp_matrix(bot, top):
    bh, th = bot.shape[2], top.shape[2]
    if bh > th:
        bot = F.adaptive_avg_pool2d(bot, (th, th))
    elif bh < th:
        top = F.adaptive_avg_pool2d(top, (bh, bh))
    bot, top = bot.unsqueeze(1), top.unsqueeze(2)
    bot = bot.view(bot.shape[0], bot.shape[1], bot.shape[2], -1)
    top = top.view(top.shape[0], top.shape[1], top.shape[2], -1)
    return (bot * top).mean(-1)


def official_nst(fs, ft):
    sh, th = fs.shape[2], ft.shape[2]
    if sh > th:
        fs = F.adaptive_avg_pool2d(fs, (th, th))
    elif sh < th:
        ft = F.adaptive_avg_pool2d(ft, (sh, sh))
    fs = F.normalize(fs.view(fs.shape[0], fs.shape[1], -1), dim=2)
    ft = F.normalize(ft.view(ft.shape[0], ft.shape[1], -1), dim=2)

    def poly(a, b):
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    return poly(ft, ft).mean() + poly(fs, fs).mean() - 2 * poly(fs, ft).mean()


def maps(seed, n=6, shapes=((8, 8, 8), (16, 4, 4))):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=generator, dtype=torch.float64).relu() for shape in shapes]


MAP_SHAPES = [((8, 8, 8), (16, 4, 4)), ((4, 4, 4), (12, 8, 8)), ((5, 6, 6), (5, 6, 6))]


@pytest.mark.parametrize("shapes", MAP_SHAPES)
@pytest.mark.parametrize("p", [2.0, 4.0])
def test_attention_transfer_equals_repdistiller(shapes, p):
    s, t = maps(0, shapes=shapes)
    assert KF.attention_transfer(s, t, p).item() == pytest.approx(official_at(s, t, p).item(), rel=1e-5)


@pytest.mark.parametrize("shapes", MAP_SHAPES + [((10,), (3, 4, 4))])
def test_similarity_preserving_equals_repdistiller(shapes):
    s, t = maps(1, shapes=shapes)
    assert KF.similarity_preserving(s, t).item() == pytest.approx(official_sp(s, t).item(), rel=1e-5)


@pytest.mark.parametrize("widths", [(8, 16), (32, 4), (3, 3)])
@pytest.mark.parametrize("offset", [0.0, 5.0])
def test_rkd_distance_and_angle_equal_repdistiller(widths, offset):
    s, t = (e + offset for e in maps(2, n=9, shapes=[(w,) for w in widths]))
    loss_d, loss_a = official_rkd(s, t)
    assert KF.rkd_distance(s, t).item() == pytest.approx(loss_d.item(), rel=1e-5)
    assert KF.rkd_angle(s, t).item() == pytest.approx(loss_a.item(), rel=1e-5)


def test_rkd_angle_with_repeated_and_nearly_equal_samples_stays_a_cosine():
    """Two equal embeddings (a repeated image, or a student whose features collapse early) give the official
    0 where RepDistiller normalises a zero difference; nearly equal ones in float32 do not explode (a Gram
    matrix's cancellation once gave cosines of 1e18 and wrecked a student)."""
    s, t = (e.float() for e in maps(5, n=8, shapes=[(16,), (32,)]))
    s, t = torch.cat([s, s[:2]]) * 100 + 1000, torch.cat([t, t[:2]])  # rows 8, 9 repeat rows 0, 1
    _, official = official_rkd(s.double(), t.double())
    assert KF.rkd_angle(s, t).item() == pytest.approx(official.item(), rel=1e-4)
    near = s.clone().requires_grad_()
    with torch.no_grad():
        near[8] = s[0] + 1e-4  # 1e-10 of the vector's size: below float32's resolution of a Gram entry
    value = KF.rkd_angle(near, t)
    value.backward()
    assert 0 <= value.item() < 2 and torch.isfinite(near.grad).all()


def test_rkd_teacher_is_a_constant_and_the_student_gets_finite_gradients():
    s, t = maps(3, n=5, shapes=[(4,), (6,)])
    s, t = s.float().requires_grad_(), t.float().requires_grad_()
    (KF.rkd_distance(s, t) + KF.rkd_angle(s, t)).backward()
    assert t.grad is None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("widths", [(8, 16), (32, 4)])
def test_pkt_and_cc_equal_repdistiller(widths):
    s, t = maps(4, n=7, shapes=[(w,) for w in widths])
    assert KF.pkt(s, t).item() == pytest.approx(official_pkt(s, t).item(), rel=1e-5)
    s2, t2 = maps(5, n=7, shapes=[(12,), (12,)])
    assert KF.correlation_congruence(s2, t2).item() == pytest.approx(official_cc(s2, t2).item(), rel=1e-5)


@pytest.mark.parametrize("sizes", [(8, 4), (4, 8), (6, 6)])
def test_fsp_equals_repdistiller(sizes):
    sb, st, tb, tt = maps(6, shapes=[(3, sizes[0], sizes[0]), (5, sizes[1], sizes[1])] * 2)
    ours = KF.fsp(sb, st, tb + 0.5, tt)
    official = (official_fsp_matrix(sb, st) - official_fsp_matrix(tb + 0.5, tt)).pow(2).mean()
    assert ours.item() == pytest.approx(official.item(), rel=1e-5)
    torch.testing.assert_close(KF.fsp_matrix(sb, st), official_fsp_matrix(sb, st).transpose(1, 2))


@pytest.mark.parametrize("shapes", MAP_SHAPES)
def test_nst_equals_repdistiller(shapes):
    s, t = maps(7, shapes=shapes)
    assert KF.nst(s, t).item() == pytest.approx(official_nst(s, t).item(), rel=1e-5)


FUNCTIONS = {
    "attention_transfer": (KF.attention_transfer, [(8, 8, 8), (16, 4, 4)]),
    "similarity_preserving": (KF.similarity_preserving, [(8, 8, 8), (16, 4, 4)]),
    "rkd_distance": (KF.rkd_distance, [(8,), (16,)]),
    "rkd_angle": (KF.rkd_angle, [(8,), (16,)]),
    "pkt": (KF.pkt, [(8,), (16,)]),
    "correlation_congruence": (KF.correlation_congruence, [(8,), (8,)]),
    "nst": (KF.nst, [(8, 8, 8), (16, 4, 4)]),
}


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["large", "zeros", "identical"])
def test_finite_on_large_zero_and_identical_features(name, dtype, case):
    fn, shapes = FUNCTIONS[name]
    s, t = maps(8, shapes=shapes)
    if case == "large":
        s, t = s * 1e3, t * 1e3
    elif case == "zeros":
        s = torch.zeros_like(s)
    elif case == "identical" and s.shape == t.shape:
        t = s.clone()
    s = s.to(dtype).requires_grad_()
    value = fn(s, t.to(dtype))
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value) and torch.isfinite(s.grad).all()


def test_identical_features_give_zero():
    (e,) = maps(9, shapes=[(8,)])
    (m,) = maps(9, shapes=[(4, 6, 6)])
    for value in (KF.rkd_distance(e, e), KF.rkd_angle(e, e), KF.pkt(e, e), KF.correlation_congruence(e, e),
                  KF.attention_transfer(m, m), KF.similarity_preserving(m, m), KF.nst(m, m), KF.fsp(m, m, m, m)):
        assert abs(value.item()) < 1e-9


@pytest.mark.parametrize("call, message", [
    (lambda: KF.attention_transfer(torch.ones(2, 8), torch.ones(2, 3, 4, 4)), "compares feature maps"),
    (lambda: KF.nst(torch.ones(2, 3, 4, 4), torch.ones(3, 3, 4, 4)), "share the batch dimension"),
    (lambda: KF.rkd_distance(torch.ones(1, 4), torch.ones(1, 4)), "at least 2 samples"),
    (lambda: KF.correlation_congruence(torch.ones(4, 4), torch.ones(4, 5)), "embeddings of one width"),
    (lambda: KF.fsp(*[torch.ones(2, 3, 4, 4)] * 3, torch.ones(2, 5, 4, 4)), "same channels"),
])
def test_bad_shapes(call, message):
    with pytest.raises(ValueError, match=message):
        call()
