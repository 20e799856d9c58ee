"""The public names and signatures of ContrastiveSegLib.losses (a contract other modules rely on)."""

from __future__ import annotations

import inspect

import pytest

import ContrastiveSegLib.losses as losses

SIGNATURES = {
    # Options added later come last, with defaults that keep the pinned formula.
    "identity_loss": "(z1, z2, lambd=0.0051, normalization='l2', distributed=None, eps=1e-08, reduction='sum')",
    "cross_correlation": "(z1, z2, normalization='l2', distributed=None, eps=1e-08)",
    "flatten_feature_map": "(features)",
    "label_contrastive_loss": (
        "(z1, y1, z2, y2, tau=0.1, background=0, reduction='paper', tile_size=4096, checkpoint=True, "
        "background_negatives=False, groups1=None, groups2=None)"
    ),
    "boundary_weight_map": "(mask, mu=8.0, eps=0.05)",
    "sample_boundary_weighted": "(label, r, mu=8.0, eps=0.05, background=0, generator=None)",
    "supcon_loss": "(z, labels, tau=0.1)",
    "position_variance_loss": "(features, target=1.0, eps=0.0001)",
    "pcgrad": "(grads, generator=None)",
    "pcgrad_per_sample": "(grads, generator=None)",
    "gradient_filter_mask": "(logits, targets, keep_fraction, valid=None)",
    "prototype_contrastive_loss": "(anchors, anchor_labels, prototypes, prototype_labels, tau=0.1)",
    "class_prototypes": "(embeddings, labels, background=0)",
    "sample_anchors": "(labels, n_per_class, background=0, generator=None)",
}


def test_all_public_names_are_exported():
    assert sorted(losses.__all__) == sorted(SIGNATURES)


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_and_docstring(name):
    function = getattr(losses, name)
    parameters = inspect.signature(function).parameters.values()
    plain = "(" + ", ".join(str(p.replace(annotation=inspect.Parameter.empty)) for p in parameters) + ")"
    assert plain == SIGNATURES[name]
    assert function.__doc__ and "Args:" in function.__doc__ and "Returns:" in function.__doc__
