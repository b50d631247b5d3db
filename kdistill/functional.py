"""Distillation losses as pure functions, in the style of ``torch.nn.functional``.

Conventions shared by every function here:

* Logits are ``[N, C]``: batch first, classes in the last dimension.
* Probabilities are handled in log-space (``log_softmax``, never ``log(softmax)``).
* Inputs are upcast to at least fp32 before any arithmetic: fp16/bf16/fp32 are
  computed in fp32 and the result is fp32; fp64 stays fp64 (so that
  ``torch.autograd.gradcheck`` works and nothing is silently downcast).
* ``reduction`` is one of ``"mean"`` (average over the batch of the per-sample
  value; for KL this is what PyTorch calls ``"batchmean"``), ``"sum"`` (sum over
  the batch) or ``"none"`` (the per-sample values, shape ``[N]``).
* ``temperature`` T must be > 0. Temperature-softened terms are multiplied by
  T^2 so that their gradients keep the same scale as T changes (Hinton et al. 2015).

Bad arguments raise ``ValueError`` with a message naming the offending value.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def _upcast(x: Tensor) -> Tensor:
    """Upcast to at least fp32: fp64 is kept, everything else becomes fp32."""
    return x if x.dtype == torch.float64 else x.float()


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must have the same shape, got "
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
        )


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _prepare(student_logits, teacher_logits, temperature, reduction):
    _check_reduction(reduction)
    if temperature is not None:
        _check_temperature(temperature)
    _check_pair(student_logits, teacher_logits)
    return _upcast(student_logits), _upcast(teacher_logits)


def _kd_per_sample(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    p_t = log_pt.exp()
    # A class with p_t == 0 contributes 0 (also when its teacher logit is -inf).
    terms = torch.where(p_t > 0, p_t * (log_pt - log_ps), 0.0)
    return temperature**2 * terms.sum(dim=-1)


def _mse_per_sample(s: Tensor, t: Tensor) -> Tensor:
    return (s - t).pow(2).mean(dim=-1)


def kd_div(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Temperature-scaled KL divergence from teacher to student.

    Per sample, with p = softmax(z / T)::

        T^2 * KL(p_t || p_s) = T^2 * sum_c p_t,c * (log p_t,c - log p_s,c)

    "mean" equals ``F.kl_div(log p_s, log p_t, reduction="batchmean", log_target=True) * T^2``.

    Hinton, Vinyals, Dean (2015), "Distilling the Knowledge in a Neural Network".
    """
    s, t = _prepare(student_logits, teacher_logits, temperature, reduction)
    return _reduce(_kd_per_sample(s, t, temperature), reduction)


def soft_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of the student against the teacher's soft targets.

    Per sample, with p = softmax(z / T)::

        T^2 * ( -sum_c p_t,c * log p_s,c ) = kd_div + T^2 * H(p_t)

    It differs from :func:`kd_div` by the teacher entropy only, so the gradient with
    respect to the student is the same; it is not 0 when student equals teacher.

    Hinton, Vinyals, Dean (2015), "Distilling the Knowledge in a Neural Network".
    """
    s, t = _prepare(student_logits, teacher_logits, temperature, reduction)
    log_ps = F.log_softmax(s / temperature, dim=-1)
    p_t = F.softmax(t / temperature, dim=-1)
    terms = torch.where(p_t > 0, -p_t * log_ps, 0.0)
    return _reduce(temperature**2 * terms.sum(dim=-1), reduction)


def logit_mse(
    student_logits: Tensor,
    teacher_logits: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """Squared error between raw logits ("logit matching").

    Per sample, the mean over the C classes (not the sum, so values are comparable
    across class counts)::

        (1 / C) * sum_c (s_c - t_c)^2

    Hence "mean" equals ``F.mse_loss(s, t)``.

    Ba, Caruana (2014), "Do Deep Nets Really Need to be Deep?".
    """
    s, t = _prepare(student_logits, teacher_logits, None, reduction)
    return _reduce(_mse_per_sample(s, t), reduction)


def tang_interpolation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    alpha: float = 0.5,
    reduction: str = "mean",
) -> Tensor:
    """Interpolation of soft-target KD and logit matching, alpha in [0, 1]::

        alpha * kd_div(s, t, T) + (1 - alpha) * logit_mse(s, t)

    After Tang, Lu, Liu, Mou, Vechtomova, Lin (2019), "Distilling Task-Specific
    Knowledge from BERT into Simple Neural Networks". The paper interpolates a
    hard-label cross-entropy with the logit squared error; here the first term is the
    soft KD term, so no labels are needed. For the paper's form combine
    :func:`cross_entropy` and :func:`logit_mse`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    s, t = _prepare(student_logits, teacher_logits, temperature, reduction)
    per_sample = alpha * _kd_per_sample(s, t, temperature) + (1.0 - alpha) * _mse_per_sample(s, t)
    return _reduce(per_sample, reduction)


def soft_targets(teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """The teacher's soft labels ``softmax(t / T)`` over the last dim, in fp32 (fp64 kept).

    Hinton, Vinyals, Dean (2015), "Distilling the Knowledge in a Neural Network".
    """
    _check_temperature(temperature)
    return F.softmax(_upcast(teacher_logits) / temperature, dim=-1)


COMBINATIONS = ("mean", "weights", "confidence")


def combine_teachers(teacher_logits: list[Tensor] | tuple[Tensor, ...], temperature: float = 1.0,
                     combine: str = "mean", weights: list[float] | tuple[float, ...] | None = None) -> Tensor:
    """Several teachers' logits [N, C] as one teacher's: logits z whose softened distribution is the
    weighted mean of theirs, softmax(z / T) = sum_i w_i softmax(z_i / T), i.e.
    z = T * logsumexp_i(log w_i + log_softmax(z_i / T)).

    combine="mean": w_i = 1 / K. "weights": the given `weights`, normalised to sum to 1.
    "confidence": per sample, w_i = softmax_i(-H_i) over the teachers, where H_i is the entropy
    of teacher i's softened distribution: a confident (low-entropy) teacher weighs more, and no
    label is needed, so it works on unlabelled samples too. Returns fp32 (fp64 stays fp64).
    """
    _check_temperature(temperature)
    if combine not in COMBINATIONS:
        raise ValueError(f"combine must be one of {COMBINATIONS}, got {combine!r}")
    if not teacher_logits:
        raise ValueError("combine_teachers needs at least one teacher's logits")
    shapes = {tuple(t.shape) for t in teacher_logits}
    if len(shapes) != 1 or teacher_logits[0].dim() != 2:
        raise ValueError(f"every teacher's logits must be [N, C] of one shape, got {sorted(shapes)}")
    log_p = torch.stack([F.log_softmax(_upcast(t) / temperature, dim=-1) for t in teacher_logits])  # [K, N, C]
    count = log_p.shape[0]
    if combine == "mean":
        log_w = torch.full((count, 1, 1), -math.log(count), dtype=log_p.dtype, device=log_p.device)
    elif combine == "weights":
        if weights is None or len(weights) != count or not all(math.isfinite(w) and w >= 0 for w in weights) \
                or sum(weights) <= 0:
            raise ValueError(f"combine='weights' needs {count} finite weights >= 0, not all 0, got {weights!r}")
        w = torch.tensor([float(x) for x in weights], dtype=log_p.dtype, device=log_p.device)
        log_w = (w / w.sum()).log().view(count, 1, 1)
    else:
        entropy = -torch.where(log_p.isfinite(), log_p.exp() * log_p, 0.0).sum(-1)  # [K, N]
        log_w = F.log_softmax(-entropy, dim=0).unsqueeze(-1)
    return temperature * torch.logsumexp(log_w + log_p, dim=0)


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Hard-label cross-entropy: ``F.cross_entropy`` on upcast logits.

    Per sample, with y the one-hot label smoothed by eps = label_smoothing in [0, 1)::

        -sum_c ((1 - eps) * y_c + eps / C) * log softmax(z)_c

    ``labels`` are class indices of shape ``[N]`` (label -100 is ignored, excluded from
    "mean", as in ``F.cross_entropy``), or class probabilities of the logits' shape (mixup and
    cutmix blend one-hot labels; then y above is that distribution). Label smoothing: Szegedy, Vanhoucke,
    Ioffe, Shlens, Wojna (2016), "Rethinking the Inception Architecture for Computer Vision".
    """
    _check_reduction(reduction)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    probabilities = labels.is_floating_point()
    if labels.shape != (logits.shape if probabilities else logits.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must be logits shape without the class dim (class indices) "
            f"or logits shape (class probabilities), got logits {tuple(logits.shape)}"
        )
    # Flatten so that the class dim is the last one also for extra leading dims.
    classes = logits.shape[-1]
    loss = F.cross_entropy(
        _upcast(logits).reshape(-1, classes),
        _upcast(labels).reshape(-1, classes) if probabilities else labels.reshape(-1),
        label_smoothing=label_smoothing,
        reduction="sum" if reduction == "mean" and not probabilities else reduction,
    )
    if reduction == "mean" and not probabilities:
        # The mean over the labelled rows, as F.cross_entropy's, but 0 (not NaN) for a batch of none.
        return loss / (labels != -100).sum().clamp(min=1)
    return loss.reshape(logits.shape[:-1]) if reduction == "none" else loss


# -- response methods beyond Hinton's KD ------------------------------------------------------

def _check_class_labels(labels: Tensor, logits: Tensor, method: str) -> None:
    if labels.is_floating_point() or labels.shape != logits.shape[:1]:
        raise ValueError(f"{method} needs class indices of shape [N] (got {tuple(labels.shape)}, "
                         f"{labels.dtype}); mixup and cutmix give class probabilities, which {method} cannot use")


def _log_binary(log_p: Tensor, target: Tensor) -> Tensor:
    """[N, 2] log-probabilities (target class, every other class together) from log-softmax [N, C]."""
    log_target = log_p.gather(1, target[:, None])
    log_others = torch.logsumexp(log_p.scatter(1, target[:, None], float("-inf")), dim=1, keepdim=True)
    return torch.cat([log_target, log_others], dim=1)


def _kl_from_logs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_c p_c (log p_c - log q_c) per row, from log-probabilities; entries with p_c = 0 count 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1)


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    reduction: str = "mean",
) -> Tensor:
    """Decoupled KD: KD split into a target-class term and a non-target-class term, weighted apart.

    Per sample, with p = softmax(z / T), y the label, b = [p_y, 1 - p_y] and p^ = the softmax over the
    classes other than y::

        alpha * T^2 * KL(b_t || b_s) + beta * T^2 * KL(p^_t || p^_s)         (TCKD + NCKD)

    Computed from log-softmax (log(1 - p_y) as a log-sum-exp over the other classes), so it stays finite
    where the official `log(softmax)` gives -inf; equal to mdistiller's `dkd_loss` elsewhere. With
    alpha = beta = 1 it is not plain KD: KD = TCKD + (1 - p_t,y) * NCKD (the paper's eq. 3). Needs C >= 2.

    Zhao, Cui, Song, Qiu, Liang (2022), "Decoupled Knowledge Distillation".
    """
    s, t = _prepare(student_logits, teacher_logits, temperature, reduction)
    _check_class_labels(labels, s, "dkd")
    if s.shape[-1] < 2:
        raise ValueError("dkd needs at least 2 classes")
    log_ps, log_pt = F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)
    tckd = _kl_from_logs(_log_binary(log_pt, labels), _log_binary(log_ps, labels))
    mask = F.one_hot(labels, s.shape[-1]).bool()
    # Non-target softmax: the label's logit removed (-inf) and the rest renormalised. The label's entry
    # is then set to log 1 in both, adding 1 * (0 - 0): no -inf reaches the KL or its gradient.
    log_qs = F.log_softmax((s / temperature).masked_fill(mask, float("-inf")), dim=-1).masked_fill(mask, 0.0)
    log_qt = F.log_softmax((t / temperature).masked_fill(mask, float("-inf")), dim=-1).masked_fill(mask, 0.0)
    nckd = _kl_from_logs(log_qt, log_qs)
    return _reduce(temperature**2 * (alpha * tckd + beta * nckd), reduction)


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of a with the same row of b (the DIST code's eps)."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """DIST: match the teacher's predictions by correlation rather than exactly, across classes and samples.

    With P = softmax(Z / T) as [N, C] matrices and rho the Pearson correlation::

        T^2 * ( beta * (1 - mean_n rho(P_s[n, :], P_t[n, :]))      inter-class, per sample
              + gamma * (1 - mean_c rho(P_s[:, c], P_t[:, c])) )   intra-class, per class over the batch

    A batch-level loss (the intra-class term needs the batch): no reduction argument; N >= 2.
    Huang, You, Wang, Qian, Xu (2022), "Knowledge Distillation from A Stronger Teacher".
    """
    s, t = _prepare(student_logits, teacher_logits, temperature, "mean")
    if s.shape[0] < 2:
        raise ValueError("dist needs a batch of at least 2 samples (its intra-class term correlates over the batch)")
    ps, pt = F.softmax(s / temperature, dim=-1), F.softmax(t / temperature, dim=-1)
    inter = 1 - _pearson_rows(ps, pt).mean()
    intra = 1 - _pearson_rows(ps.T, pt.T).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Each row minus its mean, over its (unbiased) standard deviation plus eps (Sun et al. 2024's `normalize`)."""
    logits = _upcast(logits)
    return (logits - logits.mean(dim=-1, keepdim=True)) / (eps + logits.std(dim=-1, keepdim=True))


def logit_standardized_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 2.0,
    reduction: str = "mean",
) -> Tensor:
    """KD on standardised logits: `kd_div(standardize(s), standardize(t), T)`.

    Standardising (zero mean, unit standard deviation per row) lets the student match the teacher's
    logit relations without matching their scale, so one temperature suits both. Needs C >= 2.
    Sun, Ren, Li, Wang, Cao (2024), "Logit Standardization in Knowledge Distillation".
    """
    s, t = _prepare(student_logits, teacher_logits, temperature, reduction)
    if s.shape[-1] < 2:
        raise ValueError("logit_standardized_kd needs at least 2 classes (a standard deviation)")
    return _reduce(_kd_per_sample(standardize_logits(s), standardize_logits(t), temperature), reduction)


def reverse_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Reverse KL, T^2 * KL(p_s || p_t): mode-seeking (the student may ignore classes the teacher spreads
    mass over), where KD's KL(p_t || p_s) is mass-covering. Used for generative students by Gu, Dong, Wei,
    Huang (2024), "MiniLLM: Knowledge Distillation of Large Language Models"."""
    s, t = _prepare(student_logits, teacher_logits, temperature, reduction)
    return _reduce(_kd_per_sample(t, s, temperature), reduction)


def js_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Jensen-Shannon divergence between the softened outputs, times T^2::

        T^2 * ( KL(p_s || m) + KL(p_t || m) ) / 2,   m = (p_s + p_t) / 2

    Symmetric and bounded by T^2 log 2. (Agarwal et al. 2024, "On-Policy Distillation of Language
    Models", compare it with forward and reverse KL as a distillation divergence.)
    """
    s, t = _prepare(student_logits, teacher_logits, temperature, reduction)
    log_ps, log_pt = F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_ps, log_pt]), dim=0) - math.log(2.0)
    return _reduce(temperature**2 * (_kl_from_logs(log_ps, log_m) + _kl_from_logs(log_pt, log_m)) / 2, reduction)


# -- feature and relation methods -------------------------------------------------------------
# Features are [N, ...]: maps [N, C, H, W] (any memory format) or vectors [N, D]. Where a method
# compares maps of different spatial sizes, the larger is average-pooled to the smaller, as in
# RepDistiller; channels may differ wherever the method allows it.

def _pool_to_match(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if a.shape[2:] == b.shape[2:]:
        return a, b
    size = tuple(min(x, y) for x, y in zip(a.shape[2:], b.shape[2:], strict=True))
    return F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)


def _check_batch(a: Tensor, b: Tensor, method: str, least: int = 1) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{method}: student and teacher features must share the batch dimension, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < least:
        raise ValueError(f"{method} needs a batch of at least {least} samples, got {a.shape[0]}")


def _maps(a: Tensor, b: Tensor, method: str) -> tuple[Tensor, Tensor]:
    if a.ndim != 4 or b.ndim != 4:
        raise ValueError(f"{method} compares feature maps [N, C, H, W], got {tuple(a.shape)} and {tuple(b.shape)}")
    _check_batch(a, b, method)
    return _pool_to_match(_upcast(a), _upcast(b))


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention [N, H*W]: the channel mean of f^p (f follows a ReLU in practice), L2-normalised per sample."""
    return F.normalize(feature.pow(p).mean(dim=1).flatten(1), dim=1)


def attention_transfer(student_feature: Tensor, teacher_feature: Tensor, p: float = 2.0) -> Tensor:
    """Match where the two networks look: ``mean((A_s - A_t)^2)`` with A = normalize(mean_c f^p) per sample.

    Channels may differ. Zagoruyko, Komodakis (2017), "Paying More Attention to Attention" (the
    paper's weight, 1000 over the number of maps, is the term's weight in config).
    """
    s, t = _maps(student_feature, teacher_feature, "attention_transfer")
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


def similarity_preserving(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Match which samples of a batch the networks find alike::

        || normalize_rows(F_s F_s^T) - normalize_rows(F_t F_t^T) ||_F^2 / N^2,   F = the flattened features

    Any shapes with the same batch. Tung, Mori (2019), "Similarity-Preserving Knowledge Distillation".
    """
    _check_batch(student_feature, teacher_feature, "similarity_preserving")
    s, t = _upcast(student_feature).flatten(1), _upcast(teacher_feature).flatten(1)
    g_s, g_t = F.normalize(s @ s.T, dim=1), F.normalize(t @ t.T, dim=1)
    return (g_t - g_s).pow(2).sum() / s.shape[0] ** 2


def _pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances [N, N] from the Gram matrix (memory N^2, not N^2 D), 0 on the diagonal."""
    e = e - e.mean(dim=0, keepdim=True)  # distances do not move; the Gram form loses fewer digits
    square = e.pow(2).sum(dim=1)
    d = (square[:, None] + square[None, :] - 2 * e @ e.T).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def rkd_distance(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """Relational KD, distance: Huber loss between the two networks' pairwise distances, each divided by its
    mean over distinct pairs (the teacher's taken as a constant).

    Unweighted: the paper's 25 is the term's weight. Park, Kim, Lu, Cho (2019), "Relational Knowledge Distillation".
    """
    _check_batch(student_embedding, teacher_embedding, "rkd_distance", least=2)
    d_s = _pairwise_distances(_upcast(student_embedding).flatten(1))
    with torch.no_grad():
        d_t = _pairwise_distances(_upcast(teacher_embedding).flatten(1))
        d_t = d_t / d_t[d_t > 0].mean()
    return F.smooth_l1_loss(d_s / d_s[d_s > 0].mean(), d_t)


def _angles(e: Tensor, eps: float = 1e-12) -> Tensor:
    """cos of the angle at e_i between e_j - e_i and e_k - e_i, [N, N, N] (0 where j or k is i), by the law of
    cosines from pairwise distances: <e_j - e_i, e_k - e_i> = (d_ij^2 + d_ik^2 - d_jk^2) / 2. The distances are
    taken from the differences themselves (not from a Gram matrix, whose cancellation turns two nearly equal
    samples into cosines of 1e18), so a repeated sample gives 0 as the official F.normalize does; what
    rounding is left is clamped to [-1, 1]. Memory N^3 + N^2, not N^2 D."""
    d = torch.cdist(e[None], e[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
    sq = d.square()
    dots = (sq[:, :, None] + sq[:, None, :] - sq[None, :, :]) / 2
    norms = d.clamp(min=eps)
    return (dots / (norms[:, :, None] * norms[:, None, :])).clamp(-1, 1)


def rkd_angle(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """Relational KD, angle: Huber loss between the angles every triplet of samples forms in each network
    (the teacher's taken as a constant). Memory N^3, not N^2 D.

    Unweighted: the paper's 50 is the term's weight. Park, Kim, Lu, Cho (2019), "Relational Knowledge Distillation".
    """
    _check_batch(student_embedding, teacher_embedding, "rkd_angle", least=2)
    a_s = _angles(_upcast(student_embedding).flatten(1))
    with torch.no_grad():
        a_t = _angles(_upcast(teacher_embedding).flatten(1))
    return F.smooth_l1_loss(a_s, a_t)


def pkt(student_embedding: Tensor, teacher_embedding: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer: KL between the two networks' conditional distributions of
    cosine similarity between samples, each row of ``(cos + 1) / 2`` normalised to sum to 1; the mean
    over the N^2 entries of ``p_t log((p_t + eps) / (p_s + eps))``, as the authors' code.

    Passalis, Tefas (2018), "Learning Deep Representations with Probabilistic Knowledge Transfer".
    """
    _check_batch(student_embedding, teacher_embedding, "pkt")

    def conditional(e: Tensor) -> Tensor:
        e = _upcast(e).flatten(1)
        e = e / (e.norm(dim=1, keepdim=True) + eps)
        similarity = (e @ e.T + 1) / 2
        return similarity / similarity.sum(dim=1, keepdim=True)

    p_s, p_t = conditional(student_embedding), conditional(teacher_embedding)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def correlation_congruence(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """Correlation congruence as in the authors' code shared with RepDistiller: with delta = |e_s - e_t|
    (embeddings of one width), ``mean_i sum_d delta[i, d] * delta[i + 1, d]`` over consecutive samples.

    Peng, Jin, Liu, Li, Wu, Liu, Zhou, Zhang (2019), "Correlation Congruence for Knowledge Distillation".
    """
    _check_batch(student_embedding, teacher_embedding, "correlation_congruence", least=2)
    s, t = _upcast(student_embedding).flatten(1), _upcast(teacher_embedding).flatten(1)
    if s.shape != t.shape:
        raise ValueError(f"correlation_congruence compares embeddings of one width, got {tuple(s.shape)} and "
                         f"{tuple(t.shape)}: map them to one width first (an embedding connector)")
    delta = (s - t).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """The flow of solution procedure between two maps: ``G[c1, c2] = mean_hw bottom[c1] * top[c2]``, [N, C1, C2]
    (the larger map average-pooled to the smaller's size)."""
    bottom, top = _maps(bottom, top, "fsp")
    return torch.einsum("nahw,nbhw->nab", bottom, top) / (bottom.shape[2] * bottom.shape[3])


def fsp(student_bottom: Tensor, student_top: Tensor, teacher_bottom: Tensor, teacher_top: Tensor) -> Tensor:
    """Mean squared difference of the FSP matrices of a student pair of maps and a teacher pair with the
    same channel counts. Yim, Joo, Bae, Kim (2017), "A Gift from Knowledge Distillation"."""
    g_s, g_t = fsp_matrix(student_bottom, student_top), fsp_matrix(teacher_bottom, teacher_top)
    if g_s.shape != g_t.shape:
        raise ValueError(f"fsp needs the student's and the teacher's pairs to have the same channels, got FSP "
                         f"matrices {tuple(g_s.shape[1:])} and {tuple(g_t.shape[1:])}")
    return (g_s - g_t).pow(2).mean()


def nst(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Neuron selectivity transfer: squared MMD with the polynomial kernel k(a, b) = (a . b)^2 between the
    channels of the two maps, each channel's spatial map L2-normalised (channels may differ)::

        mean k(t, t) + mean k(s, s) - 2 mean k(s, t)

    Huang, Wang (2017), "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer".
    """
    s, t = _maps(student_feature, teacher_feature, "nst")
    s, t = F.normalize(s.flatten(2), dim=2), F.normalize(t.flatten(2), dim=2)

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        return (a @ b.transpose(1, 2)).pow(2).mean()

    return kernel(t, t).detach() + kernel(s, s) - 2 * kernel(s, t)


def vid(predicted_mean: Tensor, teacher_feature: Tensor, log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    """Variational information distillation: the negative log-likelihood (up to a constant) of the teacher's
    feature under a Gaussian with the student's regressed mean and a learned variance per channel::

        mean( (mu - t)^2 / (2 var) + log(var) / 2 ),   var = softplus(log_scale) + eps

    `predicted_mean` and `teacher_feature` share one shape [N, C, ...]; `log_scale` is [C]. Ahn, Hu,
    Damianou, Lawrence, Dai (2019), "Variational Information Distillation for Knowledge Transfer".
    """
    if predicted_mean.shape != teacher_feature.shape:
        raise ValueError(f"vid needs the regressed mean and the teacher feature in one shape, got "
                         f"{tuple(predicted_mean.shape)} and {tuple(teacher_feature.shape)}")
    if log_scale.shape != predicted_mean.shape[1:2]:
        raise ValueError(f"vid needs one log_scale per channel ({predicted_mean.shape[1]}), got "
                         f"{tuple(log_scale.shape)}")
    mean, target = _upcast(predicted_mean), _upcast(teacher_feature)
    variance = (F.softplus(_upcast(log_scale)) + eps).view(1, -1, *([1] * (mean.ndim - 2)))
    return 0.5 * ((mean - target).pow(2) / variance + variance.log()).mean()


def crd_nce(log_scores: Tensor, num_data: int) -> Tensor:
    """CRD's noise-contrastive loss (Tian et al. 2020, eq. 18) on [N, 1 + K] log-scores: column 0 the
    positive pair, the K others negatives, each score exp(s . t / T) / Z with noise density 1 / num_data::

        -(1/N) sum_i [ log(P_i0 / (P_i0 + K / num_data)) + sum_k log((K / num_data) / (P_ik + K / num_data)) ]

    In log-space (softplus), so large scores do not overflow.
    """
    if log_scores.ndim != 2 or log_scores.shape[1] < 2:
        raise ValueError(f"crd_nce needs [N, 1 + K] scores with K >= 1, got {tuple(log_scores.shape)}")
    if num_data < 1:
        raise ValueError(f"crd_nce needs num_data >= 1, got {num_data}")
    scores = _upcast(log_scores)
    log_noise = math.log((scores.shape[1] - 1) / num_data)
    positive = F.softplus(log_noise - scores[:, 0])  # -log(P / (P + m Pn))
    negative = F.softplus(scores[:, 1:] - log_noise)  # -log(m Pn / (P + m Pn))
    return (positive.sum() + negative.sum()) / scores.shape[0]


def crd(student_embedding: Tensor, teacher_embedding: Tensor, student_memory: Tensor, teacher_memory: Tensor,
        temperature: float, log_z_student: Tensor | float, log_z_teacher: Tensor | float, num_data: int) -> Tensor:
    """Contrastive representation distillation, both directions: the student's embedding [N, D] against
    the teacher memory's rows [N, 1 + K, D] (its own sample first, then K negatives) and the teacher's
    embedding against the student memory's rows, each scored exp(e . m / T) / Z and put through `crd_nce`.
    Embeddings and memory rows are unit vectors; Z is the normalising constant (CRD estimates it once,
    from the first batch, as mean(exp(e . m / T)) * num_data). Tian, Krishnan, Isola (2020),
    "Contrastive Representation Distillation".
    """
    _check_temperature(temperature)
    s, t = _upcast(student_embedding), _upcast(teacher_embedding)
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"crd needs student and teacher embeddings of one shape [N, D], got {tuple(s.shape)} and "
                         f"{tuple(t.shape)}")
    for name, memory in (("student_memory", student_memory), ("teacher_memory", teacher_memory)):
        if memory.ndim != 3 or memory.shape[0] != s.shape[0] or memory.shape[2] != s.shape[1]:
            raise ValueError(f"crd needs {name} rows [N, 1 + K, D] = [{s.shape[0]}, 1 + K, {s.shape[1]}], got "
                             f"{tuple(memory.shape)}")
    return (crd_nce(crd_scores(s, teacher_memory, temperature) - log_z_student, num_data)
            + crd_nce(crd_scores(t, student_memory, temperature) - log_z_teacher, num_data))


def crd_scores(embedding: Tensor, memory_rows: Tensor, temperature: float) -> Tensor:
    """CRD's unnormalised log-scores e . m / T: [N, 1 + K] from an embedding [N, D] and memory rows [N, 1 + K, D]."""
    return torch.einsum("nkd,nd->nk", _upcast(memory_rows), _upcast(embedding)) / temperature


def hierarchical_context_loss(student_features: list[Tensor], teacher_features: list[Tensor],
                              levels: tuple[int, ...] = (4, 2, 1)) -> Tensor:
    """ReviewKD's HCL: for each pair of maps of one shape, the MSE at full size and after average pooling to
    each of `levels` (those smaller than the map), weighted 1, 1/2, 1/4, ... and normalised by the weights'
    sum; summed over the pairs. Chen, Liu, Zhao, Jia (2021), "Distilling Knowledge via Knowledge Review".
    """
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(f"hierarchical_context_loss needs as many student as teacher maps (at least one), got "
                         f"{len(student_features)} and {len(teacher_features)}")
    total = 0.0
    for s, t in zip(student_features, teacher_features, strict=True):
        if s.shape != t.shape or s.ndim != 4:
            raise ValueError(f"hierarchical_context_loss compares maps [N, C, H, W] of one shape, got "
                             f"{tuple(s.shape)} and {tuple(t.shape)}")
        s, t = _upcast(s), _upcast(t)
        loss, weight, weights = F.mse_loss(s, t), 1.0, 1.0
        for level in levels:
            if level >= s.shape[2]:
                continue
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
            weights += weight
        total = total + loss / weights
    return total
