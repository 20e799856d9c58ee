"""The ``selftrain`` command: pseudo-label self-training with a local contrastive loss (Chaitanya et al.).

Stages, each ``config.train.max_steps`` optimisation steps with its own AdamW
and cosine schedule:

* ``baseline`` (round 0): supervised Dice + CE on the labelled cases, as
  ``finetune`` does (``--init`` with a pre-training checkpoint loads its
  encoder first).  With ``--init`` of a finetune / selftrain checkpoint that
  has the same labels, that model *is* the baseline and this stage trains
  nothing;
* ``round_1`` .. ``round_R``: pseudo-label every unlabelled scan with the
  best model so far (optionally keeping only scans whose predictions on two
  augmented copies agree), then train the joint objective of
  :mod:`ContrastiveSegLib.methods.selftrain` starting from that model.

Order of work (nothing is written before every input has been checked):
settings -> datasets -> unlabelled scans -> split -> ``--init`` -> preprocessing
-> run folder -> stages.

Run folder, besides ``config.json``, ``labels.json``, ``colors.json`` and
``events.jsonl`` (see ``docs/run-folder.md`` and ``docs/selftrain.md``)::

    selftrain.json                  stage plan, finished stages, best stage, per-stage results
    checkpoints/best.pt             the best model so far by validation Dice (kind "selftrain")
    checkpoints/last.pt             the latest model (the end of the last stage when the run is done)
    stages/<stage>/checkpoints/     a stage's own trainer state, for --resume
    stages/<round>/pseudo_labels.npz  the round's pseudo-labels on the network grid, for --resume
                                    (stages/<stage>/ is removed when the stage ends; the run's
                                    checkpoints are hard links to the stage's, so nothing is copied)
    pseudo_labels/round_<r>/        the round's pseudo-labels on each scan's own grid, to look at

The whole command is one run for whoever reads the events: one ``start``
(``total_steps`` = all stages' steps), ``step`` events with one step counter
over all stages, one ``finished``.  Each stage's :class:`Trainer` writes
through :class:`_StageEvents`, which folds its own start / finished away and
offsets its steps.

One module per stage: :mod:`.baseline`, :mod:`.pseudo_labels`, and the joint
training with the run around it in :mod:`.run` (the objective itself is
:mod:`ContrastiveSegLib.methods.selftrain`); :mod:`.stages` holds the plan and
the per-stage plumbing, :mod:`.unlabeled` reads the unlabelled scans.
"""

from .pseudo_labels import augmented_agreement, body_mask_on_grid, class_probabilities, write_pseudo_label
from .run import run_selftrain, selftrain_settings
from .unlabeled import load_unlabeled_cases

__all__ = ["augmented_agreement", "body_mask_on_grid", "class_probabilities", "load_unlabeled_cases",
           "run_selftrain", "selftrain_settings", "write_pseudo_label"]
