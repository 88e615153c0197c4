"""The same pyramid of 3D U-Nets and train step in PyTorch, to time JAX against it.

Layer for layer the network of autocontext_jax/models: 3x3x3 conv (no bias) + BatchNorm +
ReLU blocks, 2x2x2 max pooling, 2x2x2 stride-2 transposed convolutions, skips, 1x1x1 head;
the pyramid feeds each finer level the coarser softmax, upsampled x2 (trilinear) and
centre-cropped. The loss is the batch soft Dice (plus cross-entropy for `dice_ce`), the
optimiser Adam. It runs eagerly, as PyTorch users run it, with oneDNN on the CPU.

`unet_from_flax` builds one level's network with the weights of a JAX level copied in, so
that the two frameworks can be checked to compute the same function
(benchmarks/monai_reference.py).

Needs `pip install torch` (an optional extra, never a dependency of the package).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

DICE_SMOOTH = 1e-5


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3x3 convolution, BatchNorm and ReLU."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm3d(out_channels, momentum=0.1),
        nn.ReLU(inplace=True),
    )


class UNet3D(nn.Module):
    """Çiçek et al. 3D U-Net, (B, C, D, H, W) -> (B, K, D, H, W) logits."""

    def __init__(self, in_channels: int, num_classes: int, width: int, num_poolings: int):
        """Build the layers; the layout matches autocontext_jax.models.unet.UNet3D."""
        super().__init__()
        self.encoder = nn.ModuleList()
        channels = in_channels
        for level in range(num_poolings + 1):
            first, second = width * 2**level, width * 2 ** (level + 1)
            block = nn.Sequential(conv_block(channels, first), conv_block(first, second))
            self.encoder.append(block)
            channels = second
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in reversed(range(num_poolings)):
            skip = width * 2 ** (level + 1)
            self.up.append(nn.ConvTranspose3d(channels, channels, 2, stride=2))
            self.decoder.append(
                nn.Sequential(conv_block(skip + channels, skip), conv_block(skip, skip))
            )
            channels = skip
        self.head = nn.Conv3d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every voxel."""
        skips = []
        for index, block in enumerate(self.encoder):
            x = block(x)
            if index < len(self.encoder) - 1:
                skips.append(x)
                x = functional.max_pool3d(x, 2)
        for up, block in zip(self.up, self.decoder, strict=True):
            x = block(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


def _copy(target: torch.Tensor, value: Any, *axes: int) -> None:
    """Copy a JAX array into a torch parameter or buffer, its axes permuted to torch's order."""
    source = torch.from_numpy(np.array(value, np.float32))
    target.copy_(source.permute(*axes) if axes else source)


def unet_from_flax(variables: dict[str, Any]) -> UNet3D:
    """The torch U-Net, in eval mode, of one JAX level's `{params, batch_stats}`.

    Flax numbers each module kind in creation order: ConvBlock_0 .. 2P+1 are the encoder's
    two blocks per level, the decoder's follow; UpConv_i is the decoder's i-th upsampling;
    Conv_0 is the head. Kernels are channels-last (k, k, k, C_in, C_out); both frameworks
    cross-correlate and put the spatial axes in the same (D, H, W) order.
    """
    params, stats = variables["params"], variables["batch_stats"]
    first, head = params["ConvBlock_0"]["Conv_0"]["kernel"], params["Conv_0"]["kernel"]
    num_poolings = sum(name.startswith("UpConv_") for name in params)
    net = UNet3D(first.shape[3], head.shape[4], first.shape[4], num_poolings)
    blocks = [block for stage in (*net.encoder, *net.decoder) for block in stage]
    with torch.no_grad():
        for index, (conv, norm, _) in enumerate(blocks):
            name = f"ConvBlock_{index}"
            _copy(conv.weight, params[name]["Conv_0"]["kernel"], 4, 3, 0, 1, 2)
            _copy(norm.weight, params[name]["BatchNorm_0"]["scale"])
            _copy(norm.bias, params[name]["BatchNorm_0"]["bias"])
            _copy(norm.running_mean, stats[name]["BatchNorm_0"]["mean"])
            _copy(norm.running_var, stats[name]["BatchNorm_0"]["var"])
        for index, up in enumerate(net.up):
            # ConvTranspose3d's weight is (C_in, C_out, k, k, k); tap (i, j, k) writes output
            # offset (i, j, k) in both (models/unet.py, UpConv).
            _copy(up.weight, params[f"UpConv_{index}"]["kernel"], 3, 4, 0, 1, 2)
            _copy(up.bias, params[f"UpConv_{index}"]["bias"])
        _copy(net.head.weight, head, 4, 3, 0, 1, 2)
        _copy(net.head.bias, params["Conv_0"]["bias"])
    return net.eval()


class Pyramid(nn.Module):
    """S U-Nets; level s > 1 takes level s-1's softmax, upsampled x2 and centre-cropped."""

    def __init__(self, config) -> None:
        """Build one U-Net per level from an autocontext_jax config."""
        super().__init__()
        model, self.mode = config.model, config.pyramid.mode
        self.levels = nn.ModuleList(
            UNet3D(
                model.in_channels + (model.num_classes if s > 0 and self.mode != "none" else 0),
                model.num_classes,
                model.width,
                model.num_poolings,
            )
            for s in range(config.pyramid.levels)
        )

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-level logits, coarsest first."""
        logits = []
        for s, (net, image) in enumerate(zip(self.levels, images, strict=True)):
            x = image
            if s > 0 and self.mode != "none":
                context = torch.softmax(logits[-1], dim=1)
                if self.mode == "stagewise":
                    context = context.detach()
                context = functional.interpolate(
                    context, scale_factor=2, mode="trilinear", align_corners=False
                )
                sizes = zip(context.shape[2:], image.shape[2:], strict=True)
                start = [(up - want) // 2 for up, want in sizes]
                context = context[
                    :,
                    :,
                    start[0] : start[0] + image.shape[2],
                    start[1] : start[1] + image.shape[3],
                    start[2] : start[2] + image.shape[4],
                ]
                x = torch.cat([image, context], dim=1)
            logits.append(net(x))
        return logits


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor, config) -> torch.Tensor:
    """Batch soft Dice over the classes (Eq. 1 of the paper), plus CE for `dice_ce`."""
    probs = torch.softmax(logits, dim=1)
    axes = (0, 2, 3, 4)
    intersection = (probs * targets).sum(axes)
    dice = (2 * intersection + DICE_SMOOTH) / (probs.sum(axes) + targets.sum(axes) + DICE_SMOOTH)
    loss = 1 - (dice if config.loss.dice_background else dice[1:]).mean()
    if config.loss.name == "dice_ce":
        loss = loss - (targets * torch.log_softmax(logits, dim=1)).sum(1).mean()
    return loss


def time_train_step(config, steps: int, warmup: int = 2, seed: int = 0) -> dict[str, float]:
    """Median seconds of `steps` Adam steps of the pyramid of `config` on random crops."""
    torch.manual_seed(seed)
    model = Pyramid(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.learning_rate)
    generator = np.random.default_rng(seed)
    crop, batch, classes = config.data.crop_size, config.train.batch_size, config.model.num_classes
    shape = (batch, config.model.in_channels, crop, crop, crop)
    images = [torch.from_numpy(generator.normal(size=shape).astype(np.float32))]
    images *= config.pyramid.levels
    labels = generator.integers(0, classes, (batch, crop, crop, crop))
    target = functional.one_hot(torch.from_numpy(labels), classes).permute(0, 4, 1, 2, 3).float()
    model.train()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = model(images)
        loss = sum(segmentation_loss(level, target, config) for level in logits)
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"median_s": float(np.median(times)), "threads": torch.get_num_threads()}
