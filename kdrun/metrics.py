"""Classification, calibration and selective-prediction metrics (``kdrun.metrics``).

Contract
--------
``classification_metrics(logits, labels, n_bins=15) -> dict[str, float]`` is pure (no state, no
side effects, inputs untouched, no autograd graph) and fully vectorised: there is no Python loop
over samples, bins or classes. It computes on the tensors' own device: softmax and the other
``[N, C]`` work in float64 if the logits are float64, otherwise in float32 (bf16/fp16/integer
logits are upcast); top-label confidences are binned, sorted and accumulated, and per-sample
values reduced, in float64 (float32 on MPS, which has no float64); the class-wise bin sums stay
in the compute dtype. It synchronises with the host exactly once, with one ``.tolist()`` of a
stacked result (no host-to-device copies either). Every value is a plain Python ``float`` and a
fraction (not a percentage).

Notation: ``N`` samples, ``C`` classes, ``p = softmax(logits)``, prediction ``argmax_c p_c``
(first index on exact ties), confidence ``conf = max_c p_c``, ``correct = [argmax p == y]``.
Equal-width bins: ``n_bins`` bins over (0, 1], bin ``i = (i/n, (i+1)/n]``, computed as
``ceil(n * v) - 1`` clamped to ``[0, n-1]`` (a value of exactly 0, possible only for a class
probability that underflowed, goes to bin 0). For top-label confidences the product is taken in
float64 (exact for float32 confidences); for the class-wise ECE it is taken in the compute
dtype, so a probability within one rounding error of an edge may land in the neighbouring bin.
This is the PS-KD code's convention (``lower < conf <= upper``); torchmetrics uses
``[i/n, (i+1)/n)`` and puts ``conf == 1`` in an extra bin, so the two agree except for
confidences lying exactly on an edge.

Keys returned
-------------
``acc1``           fraction with ``argmax p == y``.
``acc5``           top-k accuracy with ``k = min(5, C)``: a sample counts if fewer than ``k``
                   classes have a strictly larger probability than its label (exact ties go in
                   its favour), or if it is top-1 correct.
``nll``            mean over samples of ``-log p_y``, computed stably as
                   ``logsumexp(z) - z_y`` (never ``inf`` even when ``p_y`` underflows).
``brier``          mean over samples of ``sum_c (p_c - [c == y])^2`` (range [0, 2]).
``ece``            top-label ECE, ``sum_b |B_b|/N * |acc_b - conf_b|`` over the equal-width bins
                   (``acc_b``/``conf_b`` = mean correctness / mean confidence in bin ``b``).
``mce``            ``max`` over non-empty equal-width bins of ``|acc_b - conf_b|``.
``ece_adaptive``   top-label ECE with equal-mass bins: samples sorted by confidence ascending
                   (stable sort, so exact ties keep input order and may straddle a bin border),
                   then split into ``n_bins`` consecutive chunks exactly like
                   ``numpy.array_split`` (the first ``N % n_bins`` chunks hold one extra sample;
                   when ``N < n_bins`` only ``N`` one-sample chunks are non-empty), then
                   ``sum_b |B_b|/N * |acc_b - conf_b|``.
``ece_classwise``  class-wise ECE of Kull et al. (NeurIPS 2019), the same quantity as the
                   "static calibration error" (SCE) of Nixon et al. (2019):
                   ``(1/C) sum_c sum_b |B_cb|/N * |freq_cb - conf_cb|`` with
                   ``freq_cb = mean_{i in B_cb} [y_i == c]``, ``conf_cb = mean_{i in B_cb} p_ic``,
                   where, for every class ``c``, *all* ``N`` samples are binned by ``p_ic`` into
                   the equal-width bins above (``B_cb`` = samples whose ``p_ic`` falls in bin
                   ``b``). Every class counts, including classes absent from ``labels``.
                   torchmetrics 1.9 has no class-wise calibration error to match.
``aurc``           area under the risk-coverage curve (Geifman et al. 2018; PS-KD's code,
                   ``utils/metric.py`` of lgcnsai/PS-KD-Pytorch, reports it x1000): sort
                   by confidence descending; ``risk(k) = (#errors among the top k) / k``;
                   ``aurc = (1/N) sum_{k=1..N} risk(k)``. Samples with exactly equal confidence
                   are exchangeable: inside a tie group the error count is the expectation over
                   the orderings of the group (linear interpolation of the group's errors), so
                   the value does not depend on input order. Without ties this is exactly
                   PS-KD's ``calc_aurc``.
``eaurc``          ``aurc - aurc_oracle`` with the *discrete* oracle of PS-KD's code: the same
                   curve for a ranking that puts all correct samples first, i.e.
                   ``(1/N) sum_{k=1..N} max(0, k - N_correct) / k``
                   ``= (1/N) sum_{i=1..N_err} i / (N_correct + i)``. It tends to the continuous
                   ``r + (1 - r) ln(1 - r)`` (``r`` = error rate) as ``N`` grows, but unlike it is
                   exactly 0 for a perfect ranking and is never negative.
``fpr95``          misclassification detection with score ``conf`` and positives = correct
                   predictions. A threshold ``t`` predicts "correct" for ``conf >= t``; over the
                   thresholds ``t`` in the set of observed scores, ``TPR(t) = TP/N_correct``,
                   ``FPR(t) = FP/N_err``. ``fpr95 = FPR(t*)`` for the largest ``t*`` with
                   ``TPR(t*) >= 0.95`` (tested exactly as ``20 TP >= 19 N_correct``), i.e. the
                   smallest FPR reaching 95 % TPR. (Some codebases, e.g. CRL, instead take the
                   ROC point with TPR *closest* to 0.95.)
``auroc``          area under the ROC curve of the same detection problem, i.e. the
                   Mann-Whitney statistic ``P(conf_pos > conf_neg) + 0.5 P(conf_pos == conf_neg)``,
                   computed from average ranks (ties get the mean rank).

``fpr95`` and ``auroc`` are ``float('nan')`` when all predictions are correct or all are wrong
(one class of the detection problem is empty, so they are undefined). With all predictions
correct ``aurc == eaurc == 0``; with all wrong ``aurc == 1`` and ``eaurc == 0``.

Errors: ``ValueError`` (one line) if ``logits`` is not ``[N, C]`` with ``N, C >= 1``, ``labels``
is not an integer ``[N]`` tensor on the same device, a label is outside ``[0, C)``, or
``n_bins`` is not an integer ``>= 1``.

Helpers: ``confidence_and_correct`` (top-label confidence and correctness, on device) and
``reliability_bins`` (per-bin counts / accuracy / confidence / edges as Python lists, for plots).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "METRIC_KEYS",
    "classification_metrics",
    "confidence_and_correct",
    "reliability_bins",
]

METRIC_KEYS: tuple[str, ...] = (
    "acc1",
    "acc5",
    "nll",
    "brier",
    "ece",
    "mce",
    "ece_adaptive",
    "ece_classwise",
    "aurc",
    "eaurc",
    "fpr95",
    "auroc",
)


# ----------------------------------------------------------------------------- validation


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    return n_bins


def _check_inputs(logits: Tensor, labels: Tensor) -> None:
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise ValueError(
            f"logits and labels must be torch.Tensor, got {type(logits).__name__} "
            f"and {type(labels).__name__}"
        )
    if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape [N, C] with N, C >= 1, got {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must have shape [N] matching logits [N, C]; got labels {tuple(labels.shape)} "
            f"and logits {tuple(logits.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(
            f"logits and labels must be on the same device, got {logits.device} and {labels.device}"
        )


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _edges(n_bins: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Equal-width bin edges ``i / n_bins``, i = 0..n_bins (for reporting only)."""
    return torch.arange(n_bins + 1, device=device, dtype=dtype) / n_bins


# ----------------------------------------------------------------------------- building blocks


def _bin_index(values: Tensor, n_bins: int) -> Tensor:
    """Bin ``ceil(n * v) - 1`` (clamped to ``[0, n-1]``), i.e. ``(i/n, (i+1)/n]``; 0 -> bin 0."""
    return (values * n_bins).ceil_().clamp_(1, n_bins).long() - 1


def _equal_width_sums(conf: Tensor, correct: Tensor, n_bins: int) -> Tensor:
    """``[3, n_bins]``: per-bin count, sum of confidence, sum of correctness (``conf.dtype``)."""
    stats = torch.stack([torch.ones_like(conf), conf, correct.to(conf.dtype)])
    out = torch.zeros(3, n_bins, device=conf.device, dtype=conf.dtype)
    return out.index_add_(1, _bin_index(conf, n_bins), stats)


def _ece_mce(sums: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """ECE and MCE from ``_equal_width_sums``; empty bins contribute 0 to both."""
    counts, sum_conf, sum_corr = sums
    gap_sum = (sum_corr - sum_conf).abs()  # |B|/N * |acc_b - conf_b| == gap_sum_b / N
    return gap_sum.sum() / n, (gap_sum / counts.clamp_min(1)).max()


def _equal_mass_ids(n: int, n_bins: int, device: torch.device) -> Tensor:
    """Chunk id of each sorted position, chunks sized like ``numpy.array_split(range(n), n_bins)``.

    With ``q, r = divmod(n, n_bins)`` the first ``r`` chunks hold ``q + 1`` positions, the rest
    ``q``; position ``j`` is in chunk ``max(j // (q + 1), (j - r) // q)`` (``j`` if ``q == 0``).
    """
    q, r = divmod(n, n_bins)
    j = torch.arange(n, device=device)
    if q == 0:
        return j
    return torch.maximum(j // (q + 1), torch.div(j - r, q, rounding_mode="floor"))


def confidence_and_correct(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Top-label softmax confidence (float32/float64) and correctness (bool), on the logits' device.

    Raises ``ValueError`` on shape mismatch. Does not synchronise with the host (labels are
    not range-checked here; an out-of-range label is simply never counted as correct).
    """
    _check_inputs(logits, labels)
    with torch.no_grad():
        p = torch.softmax(logits.detach().to(_compute_dtype(logits)), dim=1)
        conf, pred = p.max(dim=1)
        return conf, pred == labels.long()


# ----------------------------------------------------------------------------- public API


def reliability_bins(confidences: Tensor, correct: Tensor, n_bins: int = 15) -> dict:
    """Equal-width reliability-diagram data for top-label ``confidences`` and ``correct`` flags.

    Returns a JSON-ready dict of Python scalars/lists: ``n_bins``, ``n_samples``, ``edges``
    (``n_bins + 1`` floats ``i / n_bins``), ``counts`` (ints), ``accuracy`` and ``confidence``
    (per-bin means; 0.0 for empty bins -- check ``counts``), ``ece`` and ``mce`` (identical to
    the values of :func:`classification_metrics` for the same inputs and ``n_bins``). Bins are
    ``(i/n, (i+1)/n]`` as in :mod:`kdrun.metrics`. One host synchronisation.
    """
    n_bins = _check_n_bins(n_bins)
    if not isinstance(confidences, Tensor) or not isinstance(correct, Tensor):
        raise ValueError("confidences and correct must be torch.Tensor")
    if confidences.ndim != 1 or correct.shape != confidences.shape or confidences.numel() < 1:
        raise ValueError(
            f"confidences and correct must be 1-D of equal non-zero length, got "
            f"{tuple(confidences.shape)} and {tuple(correct.shape)}"
        )
    with torch.no_grad():
        acc_dt = _acc_dtype(confidences.device)
        conf = confidences.detach().to(acc_dt)
        edges = _edges(n_bins, conf.device, acc_dt)
        sums = _equal_width_sums(conf, correct.detach(), n_bins)
        ece, mce = _ece_mce(sums, conf.numel())
        counts, sum_conf, sum_corr = sums
        denom = counts.clamp_min(1)
        packed = torch.cat(
            [edges, counts, sum_corr / denom, sum_conf / denom, ece.view(1), mce.view(1)]
        ).tolist()
    e = n_bins + 1
    return {
        "n_bins": n_bins,
        "n_samples": int(confidences.numel()),
        "edges": packed[:e],
        "counts": [int(round(c)) for c in packed[e : e + n_bins]],
        "accuracy": packed[e + n_bins : e + 2 * n_bins],
        "confidence": packed[e + 2 * n_bins : e + 3 * n_bins],
        "ece": packed[-2],
        "mce": packed[-1],
    }


def classification_metrics(logits: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float]:
    """All metrics of the module docstring for ``logits [N, C]`` and integer ``labels [N]``.

    Returns ``{key: float}`` for the keys in :data:`METRIC_KEYS` (fractions). Vectorised, on the
    inputs' device, one host synchronisation. Raises ``ValueError`` on bad shapes, dtypes,
    devices, labels outside ``[0, C)`` or ``n_bins < 1``.
    """
    _check_inputs(logits, labels)
    n_bins = _check_n_bins(n_bins)
    with torch.no_grad():
        return _classification_metrics(logits.detach(), labels.detach(), n_bins)


def _classification_metrics(logits: Tensor, labels: Tensor, n_bins: int) -> dict[str, float]:
    n, c = logits.shape
    dev = logits.device
    acc_dt = _acc_dtype(dev)
    z = logits.to(_compute_dtype(logits))

    y_raw = labels.long()
    y = y_raw.clamp(0, c - 1)  # keep gathers in range; invalid labels raise after the sync
    invalid = (y != y_raw).any()
    y_col = y.unsqueeze(1)

    # ---- per-sample quantities, [N, C] work in the compute dtype
    p = torch.softmax(z, dim=1)
    conf, pred = p.max(dim=1)
    correct = pred == y
    p_y = p.gather(1, y_col)
    # top-k correct iff fewer than k classes have a strictly larger probability than the label
    n_above = (p > p_y).to(p.dtype).sum(dim=1)
    correct_k = (n_above < min(5, c)) | correct
    # -log p_y = logsumexp(z) - z_y, with logsumexp(z) = z_j - log p_j for j = argmax p
    # (p_j >= 1/C never underflows, so this is as stable as log_softmax)
    nll_i = (z.gather(1, pred.unsqueeze(1)) - z.gather(1, y_col)).squeeze(1) - conf.log()
    # sum_c (p_c - onehot_c)^2 = sum_c p_c^2 - 2 p_y + 1
    brier_i = (torch.linalg.vecdot(p, p) - 2 * p_y.squeeze(1) + 1).clamp_min(0)
    per_sample = torch.stack([correct.to(z.dtype), correct_k.to(z.dtype), nll_i, brier_i])
    acc1, acc5, nll, brier = per_sample.to(acc_dt).mean(dim=1)

    # ---- class-wise ECE (Kull et al. 2019 / SCE of Nixon et al. 2019): one index_add over the
    # flat index c * n_bins + bin(p_ic), bin = ceil(n p) - 1 in the compute dtype (exact small
    # integers), clamped per class to [c * n_bins, c * n_bins + n_bins - 1]. index_add_ into a
    # fixed-size buffer (unlike bincount) never synchronises on CUDA.
    fdt = p.dtype if c * n_bins < 2**24 else torch.float64  # flat index exact as a float
    offs = torch.arange(c, device=dev, dtype=fdt) * n_bins
    flat = torch.mul(p.to(fdt), n_bins).ceil_().add_(offs - 1)
    flat = torch.maximum(flat, offs, out=flat).to(torch.int32 if c * n_bins < 2**31 else torch.long)
    cw = torch.zeros(2, c * n_bins, device=dev, dtype=p.dtype)
    cw[0].index_add_(0, flat.view(-1), p.view(-1))
    cw[1].index_add_(0, flat.gather(1, y_col).view(-1), torch.ones_like(conf))
    ece_classwise = (cw[1].to(acc_dt) - cw[0].to(acc_dt)).abs().sum() / (n * c)

    # ---- top-label, equal-width bins
    conf64 = conf.to(acc_dt)
    corr64 = correct.to(acc_dt)
    ece, mce = _ece_mce(_equal_width_sums(conf64, corr64, n_bins), n)

    # ---- one stable ascending sort serves equal-mass ECE, AURC, FPR95 and AUROC
    s_conf, order = conf64.sort(stable=True)
    s_corr = corr64[order]
    em = torch.zeros(2, n_bins, device=dev, dtype=acc_dt).index_add_(
        1, _equal_mass_ids(n, n_bins, dev), torch.stack([s_conf, s_corr])
    )
    ece_adaptive = (em[1] - em[0]).abs().sum() / n

    # tie groups: sorted positions [lo, hi) hold the samples whose confidence equals s_conf[m]
    lo = torch.searchsorted(s_conf, s_conf, right=False)
    hi = torch.searchsorted(s_conf, s_conf, right=True)
    pos = torch.arange(n + 1, device=dev, dtype=acc_dt)
    cum_corr = torch.cat([pos[:1], s_corr.cumsum(0)])  # correct among the j lowest, exact
    cum_err = pos - cum_corr
    n_pos = cum_corr[-1]
    n_err = n - n_pos
    m = pos[:-1]  # m lowest-confidence samples rejected <=> coverage k = N - m
    lo_f, hi_f = lo.to(acc_dt), hi.to(acc_dt)

    # AURC: expected errors among the m lowest (ties interpolated), risk = errors kept / k
    e_lo = cum_err[lo]
    err_low = e_lo + ((m - lo_f) * (cum_err[hi] - e_lo)) / (hi_f - lo_f)
    kk = n - m
    aurc = ((n_err - err_low) / kk).mean()
    oracle = ((kk - n_pos).clamp_min(0) / kk).mean()  # all correct samples ranked first
    eaurc = aurc - oracle

    # FPR at 95 % TPR: thresholds t = s_conf[m] at tie-group starts, accept conf >= t
    tp = n_pos - cum_corr[:-1]
    fp = n_err - cum_err[:-1]
    reach = (lo_f == m) & (20 * tp >= 19 * n_pos)
    fp_min = torch.where(reach, fp, torch.full_like(fp, n)).min()

    # AUROC: Mann-Whitney with average 1-based ranks (lo + hi + 1) / 2
    rank_sum_pos = torch.dot((lo_f + hi_f + 1) / 2, s_corr)
    auroc = (rank_sum_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_err).clamp_min(1)

    defined = (n_pos > 0) & (n_err > 0)
    nan = torch.full((), math.nan, device=dev, dtype=acc_dt)
    fpr95 = torch.where(defined, fp_min / n_err.clamp_min(1), nan)
    auroc = torch.where(defined, auroc, nan)

    values = torch.stack(
        [
            acc1,
            acc5,
            nll,
            brier,
            ece,
            mce,
            ece_adaptive,
            ece_classwise,
            aurc,
            eaurc,
            fpr95,
            auroc,
            invalid.to(acc_dt),
        ]
    ).tolist()  # the single host synchronisation
    if values[-1]:
        raise ValueError(f"labels must lie in [0, {c}) for logits with C={c} classes")
    return dict(zip(METRIC_KEYS, values[:-1]))
