"""Diversity of recovered image sets (paper 002 Table 1 on our data).

For every recover folder given: within-class mean pairwise cosine similarity of
penultimate teacher features (lower = more diverse) and the per-class MMD^2 to
100 real training images per class (Gaussian kernel, median-heuristic bandwidth).

    .venv/bin/python scripts/diversity_table.py --squeeze runs/results/squeeze runs/results/recover/*
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lpqld_fast.io_utils import read_json  # noqa: E402
from lpqld_fast.report import diversity_metrics  # noqa: E402


def main() -> int:
    from lpqld_fast.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--squeeze", required=True, help="squeeze folder of the teacher that scores the features")
    ap.add_argument("recover", nargs="+", help="recover folders")
    args = ap.parse_args()
    config = read_json(Path(args.squeeze) / "config.json", "squeeze config")["config"]
    print("| image set | within-class cosine (synthetic) | within-class cosine (real) | MMD^2 to real |")
    print("|---|---:|---:|---:|")
    for rec in args.recover:
        m = diversity_metrics(Path(args.squeeze), Path(rec), config)
        print(f"| {Path(rec).name} | {m['within_class_cosine_synthetic']:.4f} | {m['within_class_cosine_real']:.4f} "
              f"| {m['mmd2_synthetic_vs_real']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
