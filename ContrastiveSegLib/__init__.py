"""ContrastiveSeg engine: contrastive pre-training and few-label fine-tuning of CT organ segmentation.

The engine is independent of 3D Slicer: it runs from a terminal, a notebook,
``torchrun`` on a GPU server, or as a subprocess of the Slicer module.  Its
commands are in :mod:`ContrastiveSegLib.cli`; ``python -m ContrastiveSegLib --help``
lists them.
"""

__version__ = "0.1.0"
