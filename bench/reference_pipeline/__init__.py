"""A plain-torch re-creation of the public reference strategy (SRe2L / LPLD / LPQLD code style).

It runs the same algorithm as ``lpqld_fast`` with the same settings, but the way
the public reference scripts run it: Python loops over classes, per-sample PIL
augmentation, one pickled file per relabel batch, dense soft-label decode and
``nn.KLDivLoss``. It is the baseline of the end-to-end race; see README.md.

Stages: :mod:`.stats` (class-wise BN statistics), :mod:`.recover`,
:mod:`.relabel`, :mod:`.train`; :mod:`.run` is the CLI.
"""
