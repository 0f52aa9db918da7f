"""The baseline for bench/device_texture.py: the reference per-image loop from docs/model.md, reproduced as
described there (a Python loop over image files; per pixel: rgb/255, cv2 LAB/255, cv2.Sobel CV_64F ksize 3 /255,
meshgrid coordinates, eccentricity, two zero channels, np.stack to a float64 HxWx13 array; all arrays kept in a
list, then np.array).

Kept faithful on purpose, including what we do differently in trainer/texture.py (BGR channels read as
"RGB", LAB of uint8 input, signed unpooled Sobel, full-resolution float64 output): it is the thing measured
against, not a thing to use. Only the file pattern is a parameter (the bench writes PNGs; the original loop
globbed '*.jpg').
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def compute_texture_array(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    rgb = image / 255.0
    lab = cv2.cvtColor(image, cv2.COLOR_BGR2LAB) / 255.0
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    sobel_x = cv2.Sobel(gray, cv2.CV_64F, 1, 0, ksize=3) / 255.0
    sobel_y = cv2.Sobel(gray, cv2.CV_64F, 0, 1, ksize=3) / 255.0
    x_coords = np.linspace(0, 1, w)
    y_coords = np.linspace(0, 1, h)
    xx, yy = np.meshgrid(x_coords, y_coords)
    eccentricity = np.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    return np.stack([
        rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2],
        lab[:, :, 0], lab[:, :, 1], lab[:, :, 2],
        sobel_x, sobel_y,
        xx, yy,
        eccentricity,
        np.zeros_like(eccentricity),
        np.zeros_like(eccentricity),
    ], axis=-1)


def prepare_folder(dataset_path: str | Path, pattern: str = "*.png") -> np.ndarray:
    images = []
    for img_path in Path(dataset_path).glob(pattern):
        image = cv2.imread(str(img_path))
        images.append(compute_texture_array(image))
    return np.array(images)
