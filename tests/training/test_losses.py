import pytest
import torch

from training.data.records import DME_PRESENT
from training.losses import (
    MultiTaskLoss,
    dme_loss,
    inverse_frequency_weights,
    masked_bce_dice,
    masked_cross_entropy,
    soft_dice_loss,
)
from training.model import MultiTaskOutput


def _out(n=2, hw=8, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).requires_grad_(requires_grad)  # noqa: E731
    return MultiTaskOutput(mk(n, 5), mk(n, 3), mk(n, 5, hw, hw), torch.zeros(n, 1, 1, 1))


def test_sample_without_masks_gets_no_segmentation_gradient():
    """An image without lesion masks must not teach 'no lesions'."""
    out = _out()
    batch = {
        "dr": torch.tensor([-1, -1]), "dme": torch.tensor([-1, -1]),
        "masks": torch.zeros(2, 5, 8, 8), "has_masks": torch.tensor([True, False]),
    }
    MultiTaskLoss()(out, batch).total.backward()
    assert out.seg_logits.grad[0].abs().sum() > 0
    assert out.seg_logits.grad[1].abs().sum() == 0


def test_sample_without_grade_gets_no_classification_gradient():
    out = _out()
    batch = {
        "dr": torch.tensor([2, -1]), "dme": torch.tensor([-1, 1]),
        "masks": torch.zeros(2, 5, 8, 8), "has_masks": torch.tensor([False, False]),
    }
    MultiTaskLoss()(out, batch).total.backward()
    assert out.dr_logits.grad[0].abs().sum() > 0 and out.dr_logits.grad[1].abs().sum() == 0
    assert out.dme_logits.grad[0].abs().sum() == 0 and out.dme_logits.grad[1].abs().sum() > 0


def test_no_labels_at_all_is_zero_but_differentiable():
    out = _out()
    batch = {"dr": torch.tensor([-1, -1]), "dme": torch.tensor([-1, -1]),
             "masks": torch.zeros(2, 5, 8, 8), "has_masks": torch.tensor([False, False])}
    parts = MultiTaskLoss()(out, batch)
    assert parts.total.detach().item() == 0.0 and parts.total.requires_grad
    parts.total.backward()


def test_dme_present_code_is_marginal_likelihood():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    p = logits.softmax(1)[0]
    expected = -torch.log(p[1] + p[2])
    assert torch.allclose(dme_loss(logits, torch.tensor([DME_PRESENT])), expected)
    # exact labels are plain cross-entropy
    assert torch.allclose(dme_loss(logits, torch.tensor([0])), -torch.log(p[0]))


def test_cross_entropy_ignores_unknown_and_uses_weights():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    only_first = masked_cross_entropy(logits, torch.tensor([1, -1]))
    assert torch.allclose(only_first, torch.nn.functional.cross_entropy(logits[:1], torch.tensor([1])))


def test_dice_perfect_and_shape_errors():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :2] = 1
    logits = (target * 2 - 1) * 50
    assert float(soft_dice_loss(logits, target)) < 1e-3
    with pytest.raises(ValueError, match=r"\(1, 1, 4, 4\)"):
        soft_dice_loss(logits, torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="has_masks"):
        masked_bce_dice(logits, target, torch.tensor([True, False]))


def test_inverse_frequency_weights_favour_rare_classes():
    w = inverse_frequency_weights([100, 10, 0])
    assert w[1] > w[0] and w[2] >= w[1]
    assert torch.isclose(w.mean(), torch.tensor(1.0))
