"""Self-regulated distillation family (Mishra & Sundaram, "Knowledge distillation via
self-regulation", arXiv 2102.07125): ``method=kd``, ``significance``,
``regulated``, ``hybrid``.

The paper states the rules but not its thresholds, weight normalisation or tables; every default
marked **[reconstructed]** below is kdrun's reconstruction and is a knob.

Participation rule (self-regulation)
====================================
A sample takes part in the update only if the model misclassifies it or is not confident enough::

    m_i = 1  if  argmax_c p_i[c] != y_i  or  p_i[y_i] < beta      else 0       (p = softmax(z))

computed from the same forward pass as the loss (detached, fp32 math). With ``beta >= 0.5`` it
reduces to ``p_i[y_i] < beta`` (a correct argmax with ``p[y] < 0.5`` is already below ``beta``;
``p[y] >= 0.5`` forces a correct argmax). Default ``beta = 0.9`` **[reconstructed]**.
:func:`participation_mask` is the rule.

Loss reduction (:func:`masked_reduce`), ``reduction`` knob:

* ``batch`` (default **[reconstructed]**): ``sum_i m_i l_i / B`` (``B`` the local batch);
* ``participants``: ``sum_i m_i l_i / sum_i m_i`` — the *global* number of participants under DDP
  (one scalar all-reduce; the local sum is scaled by the world size so DDP's gradient average
  gives the exact global mean); 0 when no sample takes part.

The mask is applied with ``torch.where`` (not a product), so an infinite per-sample loss of a
non-participant cannot turn the sum into NaN.

A step with no participant: the loss is exactly 0 and every gradient exactly 0 (no host sync is
needed for that). The step reports ``StepOutput.weight = number of local participants``; an engine
that honours it (``kdrun.methods.base.EMPTY_STEPS_SKIPPED``: the global weight is 0 -> parameters and optimizer
state are restored, no sync) performs no update at all. An engine that does not would still let
SGD momentum and weight decay move the weights on such a step. Which of the two was in force is
part of the teacher's cache key (``empty_steps`` in its ``method_settings``) and of the summary
(``self_regulated/empty_steps_skipped``). BatchNorm running statistics always see the batch (the
mask is known only after the forward pass). Empty steps are counted (``data/empty_steps``).

Stage 1 — the self-regulated teacher (:class:`SelfRegulatedTeacher`)
====================================================================
Trained with CE under the participation rule (knobs ``teacher_beta`` = 0.9, ``teacher_reduction``
= ``batch`` on the students). It counts per sample how often it took part — the *significance*
``s_i`` in ``{0..E_T}`` — in an int32 :class:`~kdrun.methods.bank.SampleBank` (``add`` with the
mask; under DDP ``add`` all-gathers so every rank holds every count). Architecture: the student's
(``teacher_model: null``) or a named ``conf/model`` option (``teacher_model: resnet18``); epochs ``E_T``: the student's (``teacher_epochs: null``) or
``teacher_epochs``; init seed offset 1000; the rest of the recipe (optimizer, schedule, batch
size, data order, seed) is the student's.

The stage runs through ``runner.run_stage("teacher", SelfRegulatedTeacher(...),
method_settings={"stage": "self_regulated", "beta", "reduction", "seed_offset", "empty_steps"},
model_cfg=..., epochs=...)``. No student knob (``alpha``, ``T``, ``normalize``, the student's
``beta``/``reduction``) is in the key, and the key does not name the student class: the four
methods share one teacher per (recipe, seed, teacher knobs), and a sweep over student knobs trains
it once. The counts reach the student through the stage method object: the runner trains it (the
bank is filled), resumes it from the stage checkpoint (the bank is in the checkpoint), or loads it
from the cache entry (``StageRunner`` stores ``method.state_dict()`` in the entry and loads it on a
hit). A cache entry without method state (written by an older kdrun) is an error naming the file.

``method.teacher_ckpt=PATH`` skips the stage (``runner.load_model(PATH, teacher_model cfg)``). The
counts then come from ``method.significance_file=FILE`` if given — a ``significance.pt`` written
by any run of this family (see below) — else from ``PATH`` itself when it holds the stage method's
state: the stage's ``<run>/teacher/checkpoints/last.ckpt`` or a cache entry
``<paths.teacher_cache>/teacher-<key>.pt``. ``significance``/``hybrid`` fail with a clear error
when neither has them; ``kd``/``regulated`` train without (no teacher accounting then).

Students (stage 2; the engine's main training)
==============================================
Per-sample loss with the frozen teacher (eval mode, ``no_grad``, same augmented batch)::

    L_i = alpha * KD_T(z_s, z_t)_i + (1 - alpha) * CE(z_s, y)_i
    KD_T = T^2 * KL(softmax(z_t/T) || softmax(z_s/T))  (sum over classes, per sample)

defaults ``alpha = 0.9``, ``T = 4`` **[reconstructed]**.

* ``kd`` (:class:`KDStudent`) — control: ``loss = mean_i L_i``.
* ``significance`` (:class:`SignificanceStudent`) — ``loss = mean_i w_i L_i`` with ``w_i = s_i /
  D``; ``normalize`` (**[reconstructed]** default ``mean_nonzero``): ``mean_nonzero`` ``D =
  mean_{j: s_j > 0} s_j`` (mean weight 1 over the kept samples), ``epochs`` ``D = E_T``, ``max``
  ``D = max_j s_j``. Samples with ``s_i = 0`` are removed from the training set: the batch sampler
  (:class:`~kdrun.methods.batching.SubsetBatchSampler`) draws the global batches from the kept indices only (a permutation
  of the kept set per epoch, deterministic in ``(seed, epoch)``, sliced per rank like the default
  sampler), so an epoch has ``ceil(K / B)`` steps for ``K`` kept samples.
* ``regulated`` (:class:`RegulatedStudent`) — the student applies the participation rule to its
  own prediction (true label; knobs ``beta`` = 0.9, ``reduction`` = ``batch``); no significance.
* ``hybrid`` (:class:`HybridStudent`) — both: ``w_i`` and the ``s_i = 0`` filter, then the rule:
  ``loss = reduce(m_i * w_i * L_i)`` (``participants`` divides by the number of participants).

Data-efficiency accounting
==========================
Every stage counts per-sample participations in an int32 bank (teacher: ``s``; student: its own
``m``; ``kd``/``significance`` students: every sample they train on). Per epoch (``on_epoch_end``,
one host read; ``teacher/``-prefixed for the stage): ``data/participations`` (this epoch),
``data/participation`` (this epoch / N), ``data/distinct_samples`` (ever taken part, cumulative),
``data/empty_steps`` (cumulative; methods with the rule). Summary: ``data/participations``
(total), ``data/participation`` (total / (N * E)), ``data/distinct_samples``,
``data/participation_hist`` (number of samples per count 0..E), ``data/empty_steps`` (rule
methods), for the significance students ``data/kept_samples`` and ``data/kept_fraction``; and the
teacher's ``teacher/data/participations``,
``teacher/data/participation`` (/ (N * E_T)), ``teacher/data/distinct_samples``,
``teacher/data/significance_hist`` (samples per ``s`` = 0..E_T), ``teacher/data/epochs``.
``N`` is the whole training set, so the students' figures measure data use against it.

Files written by the students' ``prepare`` into the run dir (main rank): ``plots/significance_hist.png``
and ``.json`` (the teacher's significance histogram) and ``significance.pt`` (``{"significance":
int32 [N], "epochs": E_T, "num_samples": N, "beta", "reduction"}``; reusable as
``method.significance_file``).

Modules
=======
:mod:`.rule` (participation mask, masked reduction, significance weights), :mod:`.accounting`
(per-sample counts and their figures), :mod:`.teacher` (stage 1, its cache key, checkpoint
parsing), :mod:`.students` (stage 2: one implementation, four methods), :mod:`.plots` (the
significance files).
"""

from kdrun.methods.batching import SubsetBatchSampler
from kdrun.methods.self_regulated.accounting import Accounting, count_stats
from kdrun.methods.self_regulated.plots import save_significance_hist
from kdrun.methods.self_regulated.rule import (
    NORMALIZATIONS,
    masked_reduce,
    participation_mask,
    significance_weights,
)
from kdrun.methods.self_regulated.students import (
    HybridStudent,
    KDStudent,
    RegulatedStudent,
    SelfRegulatedStudent,
    SignificanceStudent,
)
from kdrun.methods.self_regulated.teacher import (
    TEACHER_SEED_OFFSET,
    SelfRegulatedTeacher,
    load_significance,
    teacher_settings,
)

__all__ = [
    "NORMALIZATIONS",
    "TEACHER_SEED_OFFSET",
    "Accounting",
    "HybridStudent",
    "KDStudent",
    "RegulatedStudent",
    "SelfRegulatedStudent",
    "SelfRegulatedTeacher",
    "SignificanceStudent",
    "SubsetBatchSampler",
    "count_stats",
    "load_significance",
    "masked_reduce",
    "participation_mask",
    "save_significance_hist",
    "significance_weights",
    "teacher_settings",
]
