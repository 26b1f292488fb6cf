from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from fce.data import DATASET_NAMES, DATASETS, get_dataset, make_generator, stream_seed


@pytest.mark.parametrize("name", DATASET_NAMES)
@pytest.mark.parametrize("n", [0, 1, 7, 1001])
def test_any_n_gives_n_finite_points(name, n):
    x = get_dataset(name).sample(n, make_generator(0, "train"))
    assert x.shape == (n, 2)
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_same_seed_same_tensor_other_seed_differs(name):
    ds = get_dataset(name)
    a = ds.sample(1000, make_generator(3, "train"))
    b = ds.sample(1000, make_generator(3, "train"))
    c = ds.sample(1000, make_generator(4, "train"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_same_seed_same_bytes_in_another_process():
    code = (
        "import hashlib, torch\n"
        "from fce.data import DATASETS, make_generator\n"
        "for name, ds in DATASETS.items():\n"
        "    x = ds.sample(4097, make_generator(42, 'train'))\n"
        "    print(name, hashlib.sha256(x.numpy().tobytes()).hexdigest())\n"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    assert runs[0].stdout == runs[1].stdout
    assert len(runs[0].stdout.splitlines()) == len(DATASET_NAMES)


def test_streams_are_distinct_and_stable():
    assert stream_seed(0, "train") != stream_seed(0, "eval")
    assert stream_seed(0, "train") != stream_seed(1, "train")
    assert stream_seed(5, "eval") == stream_seed(5, "eval")


def test_global_rng_is_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for ds in DATASETS.values():
        ds.sample(100, make_generator(0, "train"))
    assert torch.equal(torch.rand(3), expected)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown dataset 'moons'.*8gaussians.*pinwheel"):
        get_dataset("moons")


def test_checkerboard_density_is_exactly_log_32_on_support_and_zero_off():
    lp = get_dataset("checkerboard").log_prob(
        torch.tensor([[-3.0, -3.0], [-3.0, -1.0], [1.0, 1.0], [5.0, 5.0]])
    )
    assert lp[0].item() == pytest.approx(-math.log(32))
    assert lp[1].item() == -math.inf
    assert lp[2].item() == pytest.approx(-math.log(32))
    assert lp[3].item() == -math.inf


def test_8gaussians_matches_its_documented_geometry():
    x = get_dataset("8gaussians").sample(200_000, make_generator(0, "geo"), torch.float64)
    angle = torch.atan2(x[:, 1], x[:, 0])
    nearest = torch.round(angle / (math.pi / 4)) * (math.pi / 4)
    centre = 2 * math.sqrt(2) * torch.stack([torch.cos(nearest), torch.sin(nearest)], 1)
    offset = x - centre
    assert offset.mean(0).abs().max().item() < 0.01
    assert offset.std(0).mean().item() == pytest.approx(0.5 / math.sqrt(2), rel=0.02)
