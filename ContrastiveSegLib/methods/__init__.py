"""Training objectives: one module per method. Each is an ``nn.Module`` with a ``backbone``
whose ``forward(batch)`` returns ``(loss, {name: float})`` for :class:`~ContrastiveSegLib.engine.trainer.Trainer`."""
