"""Model selection without the test set, the per-evaluation diagnostics, and the run record."""
from __future__ import annotations

import pytest
import torch

from lpqld_fast.store.quantize import SoftLabels
from lpqld_fast.train import logit_ranges, select_evaluation


def test_selection_uses_the_validation_split_not_the_test_set() -> None:
    evals = [{"epoch": 25, "val_acc": 80.0, "test_acc": 79.0},
             {"epoch": 50, "val_acc": 82.0, "test_acc": 78.0},  # best validation: selected, though not best test
             {"epoch": 75, "val_acc": 81.0, "test_acc": 81.5}]
    s = select_evaluation(evals)
    assert (s["selected_acc"], s["selected_epoch"], s["selection"]) == (78.0, 50, "best validation accuracy")
    assert s["best_acc"] == 81.5 and s["last_acc"] == 81.5


def test_selection_ties_take_the_latest_and_no_validation_takes_the_last() -> None:
    tie = [{"epoch": 1, "val_acc": 90.0, "test_acc": 1.0}, {"epoch": 2, "val_acc": 90.0, "test_acc": 2.0}]
    assert select_evaluation(tie)["selected_epoch"] == 2
    no_val = [{"epoch": 1, "test_acc": 5.0}, {"epoch": 2, "test_acc": 3.0}]
    s = select_evaluation(no_val)
    assert (s["selected_acc"], s["selection"], s["best_acc"]) == (3.0, "last evaluation", 5.0)
    mixed = [{"epoch": 1, "test_acc": 5.0}, {"epoch": 2, "val_acc": 50.0, "test_acc": 3.0}]  # resumed older run
    assert select_evaluation(mixed)["selection"] == "last evaluation"
    with pytest.raises(ValueError, match="no evaluation"):
        select_evaluation([])


def test_logit_ranges_split_kept_and_dropped_classes() -> None:
    logits = torch.tensor([[5.0, -3.0, 1.0, -7.0], [0.0, 2.0, -1.0, 4.0]])
    labels = SoftLabels("mr", torch.zeros(2, 2), torch.tensor([[0, 2], [1, 3]]), None, None, None)
    r = logit_ranges(logits, labels)
    assert r["logit_kept_mean"] == pytest.approx((5 + 1 + 2 + 4) / 4)
    assert r["logit_dropped_mean"] == pytest.approx((-3 - 7 + 0 - 1) / 4)
    assert (r["logit_dropped_min"], r["logit_dropped_max"]) == (-7.0, 0.0)
    dense = SoftLabels("dense", torch.zeros(2, 4), None, None, None, None)
    assert logit_ranges(logits, dense) == {"logit_kept_mean": pytest.approx(float(logits.mean()))}
