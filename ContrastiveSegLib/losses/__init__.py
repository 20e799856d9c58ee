"""Loss functions of the three pre-training methods (docs/METHODS.md, sections 1-3).

One small module per loss; everything public is re-exported here:

* MixCL: :func:`identity_loss` (with :func:`flatten_feature_map`,
  :func:`cross_correlation`), :func:`label_contrastive_loss`,
  :func:`boundary_weight_map`, :func:`sample_boundary_weighted`;
* GCL: :func:`supcon_loss`, :func:`pcgrad`, :func:`pcgrad_per_sample`,
  :func:`gradient_filter_mask`;
* both: :func:`position_variance_loss` (a variance floor against position collapse);
* local contrastive loss with pseudo-labels: :func:`prototype_contrastive_loss`,
  :func:`class_prototypes`, :func:`sample_anchors`.
"""

from __future__ import annotations

from .boundary_sampling import boundary_weight_map, sample_boundary_weighted
from .gradient_filter import gradient_filter_mask
from .identity import cross_correlation, flatten_feature_map, identity_loss
from .label_contrastive import label_contrastive_loss
from .pcgrad import pcgrad, pcgrad_per_sample
from .position_variance import position_variance_loss
from .prototype import class_prototypes, prototype_contrastive_loss, sample_anchors
from .supcon import supcon_loss

__all__ = [
    "boundary_weight_map",
    "class_prototypes",
    "cross_correlation",
    "flatten_feature_map",
    "gradient_filter_mask",
    "identity_loss",
    "label_contrastive_loss",
    "pcgrad",
    "pcgrad_per_sample",
    "position_variance_loss",
    "prototype_contrastive_loss",
    "sample_anchors",
    "sample_boundary_weighted",
    "supcon_loss",
]
