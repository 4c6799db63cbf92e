"""Training package: ``xraybatch train`` builds model bundles from public data or a hospital's own studies.

Modules, in the order a run uses them: :mod:`training.datasets` (layouts, shared preprocessing, cache),
:mod:`training.splits` (patient-wise split and manifest), :mod:`training.transforms` (augmentation),
:mod:`training.losses` (class weights, focal loss, sampling), :mod:`training.pretrained` (``--init``),
:mod:`training.train` (``TrainConfig`` and the loop), :mod:`training.evaluate` (metrics, threshold, model card),
:mod:`training.tune` (Optuna) and :mod:`training.cli` (the click group). See docs/training.md.
"""
