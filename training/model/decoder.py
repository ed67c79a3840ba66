"""U-Net decoder with skip connections from every encoder stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBnRelu(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.conv1 = ConvBnRelu(cin + cskip, cout)
        self.conv2 = ConvBnRelu(cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        out: torch.Tensor = self.conv2(self.conv1(x))
        return out


class UNetDecoder(nn.Module):
    """Takes encoder features [f0 (/2), f1 (/4), f2 (/8), f3 (/16), f4 (/32)], returns a full-resolution map."""

    def __init__(self, encoder_channels: tuple[int, ...], decoder_channels: tuple[int, ...]) -> None:
        super().__init__()
        if len(encoder_channels) != 5 or len(decoder_channels) != 5:
            raise ValueError(
                f"UNetDecoder needs 5 encoder and 5 decoder channel counts, got {encoder_channels} and {decoder_channels}"
            )
        skips = list(encoder_channels[:4][::-1]) + [0]  # f3, f2, f1, f0, none
        cins = [encoder_channels[4], *decoder_channels[:-1]]
        self.blocks = nn.ModuleList(DecoderBlock(ci, cs, co) for ci, cs, co in zip(cins, skips, decoder_channels))
        self.out_channels = decoder_channels[-1]

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        skips = features[:4][::-1] + [None]
        x = features[4]
        for block, skip in zip(self.blocks, skips):
            x = block(x, skip)
        return x
