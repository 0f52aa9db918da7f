"""The 13-channel texture array pooled to the cell grid (channels: docs/model.md), in two implementations that
must agree: `texture_cv2` (opencv, one image: the independent oracle) and `cell_features` (torch, batched on the
training device, with the per-cell entropy and edge magnitude the fixed scorers read). Everything is per image:
a cell's features never depend on the rest of the batch."""
from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

CHANNELS = ("r", "g", "b", "lab_l", "lab_a", "lab_b", "sobel_x", "sobel_y",
            "pos_y", "pos_x", "eccentricity", "contrast", "saturation")
ENTROPY_BINS = 16
_GRAY = (0.299, 0.587, 0.114)  # ITU-R BT.601, as cv2.COLOR_RGB2GRAY


def _positions(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ys = (np.arange(height) + 0.5) / height
    xs = (np.arange(width) + 0.5) / width
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    ecc = np.sqrt((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / np.sqrt(0.5)
    return yy, xx, ecc


def texture_cv2(image_rgb: np.ndarray, grid: int = 8) -> np.ndarray:
    """[H,W,3] uint8 RGB -> [grid, grid, 13] float32."""
    h, w = image_rgb.shape[:2]
    if h % grid or w % grid:
        raise ValueError(f"image of {h}x{w} pixels does not divide into a {grid}x{grid} grid")
    rgb = image_rgb.astype(np.float32) / 255.0
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)  # float input: L in [0,100], a, b in about [-128,127]
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3) / 4.0
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3) / 4.0
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    yy, xx, ecc = _positions(h, w)
    pixels = np.stack([
        rgb[..., 0], rgb[..., 1], rgb[..., 2],
        lab[..., 0] / 100.0, lab[..., 1] / 255.0 + 0.5, lab[..., 2] / 255.0 + 0.5,
        np.abs(gx), np.abs(gy), yy, xx, ecc, np.zeros_like(gray), hsv[..., 1],
    ], axis=-1).astype(np.float32)
    ch, cw = h // grid, w // grid
    cells = pixels.reshape(grid, ch, grid, cw, len(CHANNELS)).mean(axis=(1, 3))
    cells[..., 11] = gray.reshape(grid, ch, grid, cw).std(axis=(1, 3))
    return cells.astype(np.float32)


class CellFeatures(NamedTuple):
    texture: torch.Tensor  # [B, 13, G, G]
    entropy: torch.Tensor  # [B, G, G] gray-level histogram entropy / log(bins), in [0,1]
    edges: torch.Tensor  # [B, G, G] mean Sobel magnitude
    pixels: torch.Tensor  # [B, G*G, 3, ch, cw] the cells' RGB pixels in [0,1]


def _srgb_to_lab(rgb: torch.Tensor, linear: torch.Tensor | None = None) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> L in [0,100], a, b (D65), the conversion cv2.COLOR_RGB2Lab documents."""
    if linear is None:
        linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = rgb.new_tensor([[0.412453, 0.357580, 0.180423],
                        [0.212671, 0.715160, 0.072169],
                        [0.019334, 0.119193, 0.950227]])
    m = m / rgb.new_tensor([0.950456, 1.0, 1.088754]).view(3, 1)  # white point folded into the matrix
    xyz = torch.einsum("ij,bjhw->bihw", m, linear)
    t = 0.008856
    f = torch.where(xyz > t, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    y = xyz[:, 1]
    lightness = torch.where(y > t, 116 * f[:, 1] - 16, 903.3 * y)
    return torch.stack([lightness, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def _srgb_linear_table(device: torch.device) -> torch.Tensor:
    """sRGB decoding of the 256 byte values: a table lookup per pixel instead of a power."""
    v = torch.arange(256, device=device, dtype=torch.float32) / 255.0
    return torch.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def _sobel(padded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cv2.Sobel (ksize 3) / 4 in x and y of a [B,1,H+2,W+2] padded plane, as its separable parts: a central
    difference and a [1,2,1] smoothing, each a sum of shifted slices. A one-channel conv2d with a 3x3 kernel is
    the slowest way to do this on a CPU (oneDNN is tuned for many channels): it took a fifth of cell_features."""
    dx = padded[..., 2:] - padded[..., :-2]  # [B,1,H+2,W]
    gx = (dx[..., :-2, :] + 2 * dx[..., 1:-1, :] + dx[..., 2:, :]) / 4.0
    dy = padded[..., 2:, :] - padded[..., :-2, :]  # [B,1,H,W+2]
    gy = (dy[..., :-2] + 2 * dy[..., 1:-1] + dy[..., 2:]) / 4.0
    return gx, gy


def cell_features(images: torch.Tensor, grid: int | tuple[int, int] = 8) -> CellFeatures:
    """images: [B,H,W,3] uint8 (or float in [0,255]) -> CellFeatures. No gradients flow here.
    grid: G for a GxG grid, or (rows, cols) for a Qwen-VL merged-token grid of a non-square image.

    Every channel that is a per-pixel mean is pooled to the cell grid before the channels are stacked, and the
    image-independent planes (position, eccentricity) are built once per call at cell resolution: a 224x224
    batch never holds a 13-channel full-resolution array."""
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    b, h, w, _ = images.shape
    ch, cw = h // rows, w // cols
    device = images.device
    chw = images.permute(0, 3, 1, 2)
    rgb = chw.float() / 255.0
    linear = _srgb_linear_table(device)[chw.long()] if images.dtype == torch.uint8 else None
    gray = (rgb * rgb.new_tensor(_GRAY).view(1, 3, 1, 1)).sum(1, keepdim=True)
    padded = F.pad(gray, (1, 1, 1, 1), mode="reflect")  # reflect == cv2's default BORDER_REFLECT_101
    gx, gy = _sobel(padded)
    lab = _srgb_to_lab(rgb, linear)
    cmax, cmin = rgb.amax(1, keepdim=True), rgb.amin(1, keepdim=True)
    saturation = torch.where(cmax > 0, (cmax - cmin) / cmax.clamp_min(1e-12), torch.zeros_like(cmax))

    def pool(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, (ch, cw))

    # The position planes are built on the images' device: a host tensor here breaks (or syncs) every GPU step.
    ys = (torch.arange(h, device=device, dtype=rgb.dtype) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=rgb.dtype) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    ecc = torch.sqrt((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / math.sqrt(0.5)
    position = pool(torch.stack([yy, xx, ecc])[None]).expand(b, -1, -1, -1)
    gray_mean, gray_sq = pool(gray), pool(gray * gray)
    contrast = (gray_sq - gray_mean * gray_mean).clamp_min(0).sqrt()
    lab_scale = rgb.new_tensor([1 / 100.0, 1 / 255.0, 1 / 255.0]).view(1, 3, 1, 1)
    lab_shift = rgb.new_tensor([0.0, 0.5, 0.5]).view(1, 3, 1, 1)
    texture = torch.cat([pool(rgb), pool(lab) * lab_scale + lab_shift, pool(gx.abs()), pool(gy.abs()),
                         position, contrast, pool(saturation)], dim=1)
    # Gray-level entropy per cell: one scatter_add of (cell, bin) counts (one_hot would check the bin range on
    # the host, a sync per batch).
    cell_of_pixel = ((torch.arange(h, device=device) // ch)[:, None] * cols
                     + (torch.arange(w, device=device) // cw)[None, :]).reshape(1, -1)
    bins = (gray.reshape(b, -1) * ENTROPY_BINS).long().clamp(0, ENTROPY_BINS - 1) + cell_of_pixel * ENTROPY_BINS
    hist = torch.zeros(b, rows * cols * ENTROPY_BINS, device=device, dtype=rgb.dtype)
    hist = hist.scatter_add_(1, bins, torch.ones_like(bins, dtype=rgb.dtype)).view(b, rows, cols, ENTROPY_BINS)
    hist = hist / (ch * cw)
    entropy = -(hist * hist.clamp_min(1e-12).log()).sum(-1) / math.log(ENTROPY_BINS)
    edges = pool(torch.sqrt(gx ** 2 + gy ** 2))[:, 0]
    cells = rgb.reshape(b, 3, rows, ch, cols, cw).permute(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, 3, ch, cw)
    return CellFeatures(texture, entropy, edges, cells)
