"""``contrastiveseg study``: Dice against the number of labelled scans, for several starts, paired over seeds.

Modules: :mod:`.design` (arms, budget, the paired subsets and cells),
:mod:`.runner` (cells as run folders: resume, interrupt, GPUs),
:mod:`.scoring` (predict + evaluate on the test cases),
:mod:`.statistics` (paired bootstrap interval, verdict, study size),
:mod:`.report` (study.csv, study.png, report.md).
"""
