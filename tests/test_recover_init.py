"""recover.init=real: synthesis starts from random real training images of each image's class."""
from __future__ import annotations

import pytest
import torch

from lpqld_fast.cli import main
from tests.cli_args import tiny_args
from lpqld_fast.data import get_dataset
from lpqld_fast.real_images import select_indices
from lpqld_fast.recover import recover_units, unit_positions

TINY = tiny_args({"recover.ipc": 3, "recover.iterations": 1, "recover.lr": 1e-9})


@pytest.mark.parametrize("cb", [True, False])
@pytest.mark.parametrize("cs", [True, False])
def test_unit_positions_cover_every_image_once(cb, cs) -> None:
    classes, ipc = 4, 3
    pairs = []
    for u in recover_units(classes, ipc, cb, cs):
        pos = unit_positions(u, cb, classes)
        assert pos.shape == u.labels.shape
        pairs += list(zip(u.labels.tolist(), pos.tolist()))
    assert sorted(pairs) == [(c, i) for c in range(classes) for i in range(ipc)]


@pytest.fixture(scope="module")
def squeezed(tmp_path_factory, synthetic_run_module):
    run = tmp_path_factory.mktemp("recover-init") / "run"
    assert main(["squeeze", "--out", str(run), *TINY]) == 0
    return run


@pytest.mark.parametrize("batching", [[], ["--set", "recover.classwise_batching=false",
                                           "--set", "recover.classwise_supervision=false"]])
def test_real_start_is_the_paper001_pick(squeezed, tmp_path, batching) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(squeezed / "squeeze", run / "squeeze")
    shutil.copy(squeezed / "run.json", run / "run.json")
    assert main(["recover", "--out", str(run), *TINY, *batching, "--set", "recover.init=real", "--seed", "5"]) == 0
    got = torch.load(run / "recover" / "images.pt", weights_only=True)
    train = get_dataset("synthetic", "train")
    picked = select_indices(train.labels, train.num_classes, 3, "random", seed=5)
    want = train.images[torch.cat(picked)]  # class-major, as images.pt
    assert torch.equal(got["labels"], train.labels[torch.cat(picked)])
    # one Adam step of lr 1e-9 moves no pixel by a grey level beyond the uint8 rounding
    assert (got["images"].int() - want.int()).abs().max() <= 1
    noise = tmp_path / "noise"
    shutil.copytree(squeezed / "squeeze", noise / "squeeze")
    shutil.copy(squeezed / "run.json", noise / "run.json")
    assert main(["recover", "--out", str(noise), *TINY, *batching, "--seed", "5"]) == 0
    other = torch.load(noise / "recover" / "images.pt", weights_only=True)["images"]
    assert (other.int() - want.int()).abs().max() > 1  # the default start is noise, not the real images
