"""The 13-channel texture array, pooled to the cell grid, in two implementations that must agree.

Channels (per cell): 0-2 RGB, 3-5 CIELAB L*, a*, b* (scaled to ~[0,1]), 6-7 |Sobel gx|, |Sobel gy|,
8-9 normalized y and x, 10 eccentricity from the centre, 11 local contrast (std of gray in the cell),
12 saturation. Everything is per image: no batch statistics, so a cell's features never depend on
what else is in the batch.

- `texture_cv2`: one RGB uint8 image with opencv, for the pipeline's data-prep of image files.
- `cell_features`: a batch with torch, for training; also returns the per-cell gray-level entropy and
  edge magnitude that the fixed scorers read.
"""
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
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


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


def _srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> L in [0,100], a, b (D65), the conversion cv2.COLOR_RGB2Lab documents."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = rgb.new_tensor([[0.412453, 0.357580, 0.180423],
                        [0.212671, 0.715160, 0.072169],
                        [0.019334, 0.119193, 0.950227]])
    xyz = torch.einsum("ij,bjhw->bihw", m, linear)
    xyz = xyz / rgb.new_tensor([0.950456, 1.0, 1.088754]).view(1, 3, 1, 1)
    t = 0.008856
    f = torch.where(xyz > t, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    y = xyz[:, 1]
    lightness = torch.where(y > t, 116 * f[:, 1] - 16, 903.3 * y)
    return torch.stack([lightness, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def cell_features(images: torch.Tensor, grid: int = 8) -> CellFeatures:
    """images: [B,H,W,3] uint8 (or float in [0,255]) -> CellFeatures. No gradients flow here."""
    b, h, w, _ = images.shape
    rgb = images.permute(0, 3, 1, 2).float() / 255.0
    gray = (rgb * rgb.new_tensor(_GRAY).view(1, 3, 1, 1)).sum(1, keepdim=True)
    kernel = gray.new_tensor(_SOBEL_X)
    padded = F.pad(gray, (1, 1, 1, 1), mode="reflect")  # reflect == cv2's default BORDER_REFLECT_101
    gx = F.conv2d(padded, kernel.view(1, 1, 3, 3)) / 4.0
    gy = F.conv2d(padded, kernel.t().contiguous().view(1, 1, 3, 3)) / 4.0
    lab = _srgb_to_lab(rgb)
    cmax, cmin = rgb.max(1).values, rgb.min(1).values
    saturation = torch.where(cmax > 0, (cmax - cmin) / cmax.clamp_min(1e-12), torch.zeros_like(cmax))
    # The position planes are built on the images' device: a host tensor here breaks (or syncs) every GPU step.
    ys = (torch.arange(h, device=rgb.device, dtype=rgb.dtype) + 0.5) / h
    xs = (torch.arange(w, device=rgb.device, dtype=rgb.dtype) + 0.5) / w
    yy, xx = (a.expand(b, h, w) for a in torch.meshgrid(ys, xs, indexing="ij"))
    ecc = torch.sqrt((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / math.sqrt(0.5)
    pixels = torch.stack([
        rgb[:, 0], rgb[:, 1], rgb[:, 2],
        lab[:, 0] / 100.0, lab[:, 1] / 255.0 + 0.5, lab[:, 2] / 255.0 + 0.5,
        gx[:, 0].abs(), gy[:, 0].abs(), yy, xx, ecc, torch.zeros_like(yy), saturation,
    ], dim=1)
    ch, cw = h // grid, w // grid
    texture = F.avg_pool2d(pixels, (ch, cw))
    gray_cells = gray[:, 0].reshape(b, grid, ch, grid, cw)
    texture[:, 11] = gray_cells.std(dim=(2, 4), unbiased=False)
    bins = (gray_cells * ENTROPY_BINS).long().clamp(0, ENTROPY_BINS - 1)
    # A histogram by scatter_add, not one_hot: one_hot checks the bin range on the host (a sync per batch).
    flat_bins = bins.permute(0, 1, 3, 2, 4).reshape(b, grid, grid, ch * cw)
    hist = torch.zeros(b, grid, grid, ENTROPY_BINS, device=rgb.device, dtype=rgb.dtype)
    hist = hist.scatter_add_(-1, flat_bins, torch.ones_like(flat_bins, dtype=rgb.dtype)) / (ch * cw)  # [B,G,G,bins]
    entropy = -(hist * hist.clamp_min(1e-12).log()).sum(-1) / math.log(ENTROPY_BINS)
    edges = F.avg_pool2d(torch.sqrt(gx ** 2 + gy ** 2), (ch, cw))[:, 0]
    cells = rgb.reshape(b, 3, grid, ch, grid, cw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, 3, ch, cw)
    return CellFeatures(texture, entropy, edges, cells)
