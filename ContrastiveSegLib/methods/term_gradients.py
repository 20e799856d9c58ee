"""How strongly each term of a pre-training objective pulls on the encoder, logged as events.

A weighted sum of losses trains mostly what its largest gradient says: when one
term's encoder gradient is a thousand times another's, the small term barely
counts, whatever its weight was meant to do (docs/pretraining.md).  The
objectives measure the gradient norm of each weighted term with respect to the
encoder's parameters at the first step and every ``every`` steps, and the run
writes it as a ``term_gradients`` event; at the first step, terms more than
``RATIO_WARNING`` apart raise a warning that names them.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence

import torch

RATIO_WARNING = 100.0


def encoder_gradient_norms(terms: Dict[str, torch.Tensor], parameters: Sequence[torch.nn.Parameter]
                           ) -> Dict[str, float]:
    """L2 norm of ``d term / d parameters`` for each (scalar) term; the graph is kept for the real backward.

    A term that does not reach the parameters (or is a connected exact zero) has norm 0.
    """
    parameters = [p for p in parameters if p.requires_grad]
    norms: Dict[str, float] = {}
    for name, term in terms.items():
        if not term.requires_grad:
            norms[name] = 0.0
            continue
        grads = torch.autograd.grad(term, parameters, retain_graph=True, allow_unused=True)
        squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        norms[name] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
    return norms


def unbalanced_terms(norms: Dict[str, float], ratio: float = RATIO_WARNING) -> Optional[str]:
    """A sentence naming the largest and smallest term when they differ by more than ``ratio`` (else None)."""
    if len(norms) < 2:
        return None
    largest = max(norms, key=norms.get)
    smallest = min(norms, key=norms.get)
    if norms[largest] <= 0 or norms[largest] <= ratio * norms[smallest]:
        return None
    factor = "infinitely" if norms[smallest] == 0 else f"{norms[largest] / norms[smallest]:.3g}x"
    return (f"the encoder gradient of {largest} ({norms[largest]:.3g}) is {factor} that of {smallest} "
            f"({norms[smallest]:.3g}) at step 0: {smallest} will barely train the encoder. What to do: "
            f"re-weigh the terms with --set (see docs/pretraining.md, 'Balanced terms').")


class TermGradientLog:
    """Decides when to measure, and writes what was measured.

    The step comes from the batch's sample indices (``batch["index"]``, sample ``i`` of the run):
    with ``samples_per_step`` samples per optimisation step over all processes, the first
    micro-batch of step ``s`` on every rank starts at a multiple of the per-rank step size, so
    every rank measures at the same steps (the measurement may all-reduce, e.g. the identity loss).

    Args:
        every: measure at step 0 and every ``every`` steps (0: only at step 0).
        samples_per_step: samples of one optimisation step over all processes.
        samples_per_rank_step: samples of one optimisation step on one process (micro-batches included).
    """

    def __init__(self, every: int, samples_per_step: int, samples_per_rank_step: int):
        self.every = int(every)
        self.samples_per_step = max(int(samples_per_step), 1)
        self.samples_per_rank_step = max(int(samples_per_rank_step), 1)
        self.events = None            # an EventLog, set by the pretrain driver; None in tests
        self.active_batches = 0       # micro-batches whose label term had a gradient (MixCL)
        self.counted_batches = 0
        self.last: Dict[str, float] = {}

    def step_to_measure(self, batch: Dict[str, torch.Tensor]) -> Optional[int]:
        """The step number when this micro-batch is one to measure, else None."""
        if "index" not in batch:
            return None
        first = int(batch["index"].reshape(-1)[0])
        if first % self.samples_per_rank_step:
            return None
        step = first // self.samples_per_step
        if step == 0 or (self.every > 0 and step % self.every == 0):
            return step
        return None

    def count_label_gradient(self, active: bool) -> None:
        self.active_batches += int(bool(active))
        self.counted_batches += 1

    def label_gradient_share(self) -> Optional[float]:
        return self.active_batches / self.counted_batches if self.counted_batches else None

    def report(self, step: int, norms: Dict[str, float]) -> None:
        """Write a ``term_gradients`` event; at step 0 warn about terms more than ``RATIO_WARNING`` apart."""
        self.last = dict(norms)
        fields = {"step": step, "norms": dict(norms)}
        share = self.label_gradient_share()
        if share is not None:
            fields["label_gradient_share"] = share
        if self.events is not None:
            self.events.emit("term_gradients", **fields)
        if step == 0:
            problem = unbalanced_terms(norms)
            if problem:
                if self.events is not None:
                    self.events.message(problem, level="warning")
                warnings.warn(problem, stacklevel=2)
