"""The teacher: built from the squeeze section's model name and the dataset's metadata, loaded from a
checkpoint. Squeeze trains it; recover, relabel, report, the real-image selection and the experts load it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lpqld_fast.io_utils import load_tensors
from lpqld_fast.models import get_model

__all__ = ["build_teacher", "load_teacher"]


def build_teacher(cfg: dict[str, Any], meta: Any) -> nn.Module:
    """The (untrained) teacher of squeeze section ``cfg`` for a dataset with metadata ``meta``."""
    # squeeze.width is checked against the model by config.check_config
    kwargs = {"width": cfg["width"]} if cfg.get("width") is not None else {}
    return get_model(cfg["model"], num_classes=meta.num_classes, in_chans=meta.in_chans, image_size=meta.image_size,
                     **kwargs)


def load_teacher(path: str | Path, model: nn.Module) -> nn.Module:
    """Load teacher weights (state dict, safely) into ``model``; a clear error for another architecture."""
    state = load_tensors(path, what="teacher checkpoint")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        # line 0 is "Error(s) in loading state_dict for X:"; line 1 names the missing/unexpected keys
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise ValueError(f"teacher checkpoint {path} does not fit model {type(model).__name__} "
                         f"(another architecture?): {detail}") from None
    return model
