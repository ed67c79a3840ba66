"""The chirality network's functional core (training/chirality.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.chirality import (
    CROP,
    STORE,
    ChiralityEnsemble,
    ChiralityNet,
    augment,
    chirality_input,
    chirality_logit,
    chirality_logits,
    fit_chirality,
    pack_net,
    unpack_net,
    view_batch,
)
from training.data.synthetic import make_fundus


def _fundus(seed: int) -> np.ndarray:
    return make_fundus(np.random.default_rng(seed), size=300, eye="R", dr_grade=0).image


@pytest.fixture(scope="module")
def net() -> ChiralityNet:
    torch.manual_seed(0)
    return ChiralityNet().eval()


def test_the_answer_ignores_a_rotation_by_180_degrees_and_a_mirror_inverts_it(net):
    """A camera that inverts a photo leaves its eye; a mirror image shows the other eye: the four-view average
    makes both exact, whatever the weights (a view set missing the rotated or a mirrored view fails this)."""
    square = _fundus(1)
    z = chirality_logit(net, square)
    assert abs(z) > 1e-4  # an untrained network still answers something
    assert chirality_logit(net, square[::-1, ::-1]) == pytest.approx(z, abs=1e-4)
    assert chirality_logit(net, square[:, ::-1]) == pytest.approx(-z, abs=1e-4)
    assert chirality_logit(net, square[::-1, :]) == pytest.approx(-z, abs=1e-4)


def test_views_and_the_stored_photo():
    stored = chirality_input(_fundus(2))
    assert stored.shape == (STORE, STORE, 3) and stored.dtype == np.uint8
    views, sign = view_batch(stored)
    assert views.shape == (4, CROP, CROP, 3) and list(sign) == [1, 1, -1, -1]
    np.testing.assert_array_equal(views[1], views[0][::-1, ::-1])
    np.testing.assert_array_equal(views[2], views[0][:, ::-1])
    np.testing.assert_array_equal(views[3], views[0][::-1, :])
    with pytest.raises(ValueError, match="square fundus crop"):
        chirality_input(np.zeros((20, 30, 3), np.uint8))


def test_augment_flips_the_label_exactly_when_it_mirrors():
    """A photo whose left half is bright: after the random view, the bright half is on the left again when the
    view was rotated (same eye) and on the right when mirrored, and the label says which (rotation or not)."""
    img = np.full((STORE, STORE, 3), 40, np.uint8)
    img[:STORE // 2, :STORE // 2] = 220  # top-left: a chiral mark (rotation moves it to bottom-right)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(60):
        out, label = augment(img, 1.0, rng)
        assert out.shape == (CROP, CROP, 3)
        q = [out[:CROP // 2, :CROP // 2].mean(), out[:CROP // 2, CROP // 2:].mean(),
             out[CROP // 2:, :CROP // 2].mean(), out[CROP // 2:, CROP // 2:].mean()]
        corner = int(np.argmax(q))  # 0 TL, 1 TR, 2 BL, 3 BR
        seen.add(corner)
        assert label == (1.0 if corner in (0, 3) else 0.0)  # TL/BR: as is or rotated; TR/BL: mirrored
    assert seen == {0, 1, 2, 3}


def test_training_learns_a_chiral_mark_and_resumes_exactly(tmp_path):
    """Photos whose eye is a chiral mark (a bright bar clockwise or anticlockwise of a dot), shown at any of the
    four views: a few epochs from random weights learn it; an interrupted run resumed from its checkpoint ends with
    the same weights as an uninterrupted one."""
    rng = np.random.default_rng(0)
    size, crop = 64, 48

    def photo(right: bool) -> np.ndarray:
        img = np.full((size, size, 3), 60, np.uint8)
        img[20:26, 20:44] = 230  # a horizontal bar
        if right:
            img[26:40, 38:44] = 230  # ... turning down at its right end: an L mirrored is the other eye
        else:
            img[26:40, 20:26] = 230
        k = rng.integers(0, 2)
        return np.ascontiguousarray(img[::-1, ::-1] if k else img)

    labels = (np.arange(64) % 2).astype(np.float32)
    images = np.stack([photo(bool(v)) for v in labels])
    net = fit_chirality(images, labels, epochs=4, checkpoint=tmp_path / "a.pt", batch=16, crop=crop, lr=1e-3)
    test_labels = (np.arange(16) % 2).astype(bool)
    test = np.stack([photo(bool(v)) for v in test_labels])
    assert ((chirality_logits(net, test, crop=crop) > 0) == test_labels).mean() >= 0.9

    full = fit_chirality(images, labels, epochs=2, checkpoint=tmp_path / "full.pt", batch=16, crop=crop)

    def stop_after_one(epoch: int, *_: object) -> None:
        if epoch == 1:
            raise _Stop

    with pytest.raises(_Stop):
        fit_chirality(images, labels, epochs=2, checkpoint=tmp_path / "part.pt", batch=16, crop=crop, on_epoch=stop_after_one)
    assert torch.load(tmp_path / "part.pt", weights_only=False)["epoch"] == 1
    epochs_run: list[int] = []
    resumed = fit_chirality(images, labels, epochs=2, checkpoint=tmp_path / "part.pt", batch=16, crop=crop,
                            on_epoch=lambda e, *_: epochs_run.append(e))
    assert epochs_run == [2]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="delete it to start again"):
        fit_chirality(images, labels, epochs=5, checkpoint=tmp_path / "part.pt", batch=16, crop=crop)
    (tmp_path / "part.pt").write_bytes(b"cut short")
    with pytest.raises(ValueError, match="not a readable chirality run checkpoint .* delete it"):
        fit_chirality(images, labels, epochs=2, checkpoint=tmp_path / "part.pt", batch=16, crop=crop)


def test_the_packed_network_answers_as_the_trained_one(net):
    """Half precision in the model file: the logit moves by little, the answer not at all on a clear case."""
    square = _fundus(3)
    again = unpack_net(pack_net(net))
    assert all(v.dtype == torch.float16 for k, v in pack_net(net)["state"].items() if "running" not in k and v.is_floating_point())
    assert chirality_logit(again, square) == pytest.approx(chirality_logit(net, square), abs=2e-2)


def test_an_ensemble_answers_its_members_mean_with_the_same_guarantees_and_packs(net):
    """E13: the ensemble's logit is the mean of its members' (not, say, the first member's); the mean keeps the
    rotation invariance and the mirror inversion exact; packing keeps every member; an empty or mixed ensemble is
    refused."""
    torch.manual_seed(1)
    other = ChiralityNet().eval()
    both = ChiralityEnsemble([net, other]).eval()
    square = _fundus(4)
    z1, z2, z = chirality_logit(net, square), chirality_logit(other, square), chirality_logit(both, square)
    assert abs(z1 - z2) > 1e-3 and z == pytest.approx((z1 + z2) / 2, abs=1e-4)
    assert chirality_logit(both, square[::-1, ::-1]) == pytest.approx(z, abs=1e-4)
    assert chirality_logit(both, square[:, ::-1]) == pytest.approx(-z, abs=1e-4)
    packed = pack_net(both)
    assert len(packed["members"]) == 2 and "state" not in packed
    again = unpack_net(packed)
    assert isinstance(again, ChiralityEnsemble) and chirality_logit(again, square) == pytest.approx(z, abs=2e-2)
    with pytest.raises(ValueError, match="non-empty list"):
        unpack_net({"backbone": "resnet18", "members": []})
    with pytest.raises(ValueError, match="at least one network"):
        ChiralityEnsemble([])
    with pytest.raises(ValueError, match="all of one backbone"):
        ChiralityEnsemble([net, ChiralityNet("resnet34")])


class _Stop(Exception):
    pass
