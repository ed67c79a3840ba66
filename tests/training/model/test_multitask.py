import pytest
import torch

from training.model import ModelConfig, build_model
from training.model.encoder import ResNetEncoder


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50"])
def test_output_shapes_per_backbone(backbone):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, image_size=64, decoder_channels=(32, 16, 16, 8, 8))).eval()
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.dr_logits.shape == (2, 5)
    assert out.dme_logits.shape == (2, 3)
    assert out.seg_logits.shape == (2, 5, 64, 64)
    assert out.features.shape[-2:] == (2, 2)


def test_rejects_wrong_input_shape_naming_it():
    model = build_model(ModelConfig(backbone="resnet18", image_size=64))
    with pytest.raises(ValueError, match=r"\(1, 3, 60, 64\)"):
        model(torch.randn(1, 3, 60, 64))


def test_config_round_trip_and_unknown_key():
    cfg = ModelConfig(backbone="resnet18", image_size=96)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": "blue"})


def test_local_weights_file_is_loaded(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(ref.conv1.weight, 0.125)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    enc = ResNetEncoder("resnet18", path)
    assert torch.all(enc.stem[0].weight == 0.125)


def test_missing_or_mismatched_weights_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained_weights"):
        ResNetEncoder("resnet18", tmp_path / "absent.pth")
    import torchvision

    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="does not match the backbone"):
        ResNetEncoder("resnet18", path)
