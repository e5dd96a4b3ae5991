"""scikit-learn's handwritten digits (1,797 greyscale 8 x 8 images, 16 levels, 10 classes; shipped inside the
package) as a class-folder image dataset, and a classifier trained on the real digits that reads generated ones."""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.svm import SVC

LEVELS = 16  # the digits' pixel values are 0..16
SIDE = 8


def write_digits(folder: Path, resolution: int) -> Path:
    """Every digit as an RGB PNG upscaled (bilinear) to resolution x resolution, in ``folder/<digit>/``
    (the ImageNet layout `dcae encode-latents` reads). Returns ``folder``."""
    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        pixels = np.round(image * (255 / LEVELS)).astype(np.uint8)
        path = Path(folder) / str(label) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize((resolution, resolution), Image.Resampling.BILINEAR).convert("RGB").save(path)
    return Path(folder)


def to_digit_features(images: torch.Tensor) -> np.ndarray:
    """Images (N, 3, H, W) in [-1, 1] -> (N, 64) as the real digits are: grey, area-averaged to 8 x 8, 0..16."""
    grey = images.float().mean(1, keepdim=True)
    small = F.adaptive_avg_pool2d(grey, SIDE)
    return ((small + 1) / 2 * LEVELS).clamp(0, LEVELS).flatten(1).numpy()


class DigitClassifier:
    """An RBF support-vector classifier fitted on 80% of the real digits; ``real_accuracy`` is its accuracy on the
    other 20%."""

    def __init__(self, seed: int = 0):
        digits = load_digits()
        order = np.random.default_rng(seed).permutation(len(digits.target))
        split = int(0.8 * len(order))
        train, test = order[:split], order[split:]
        features = digits.images.reshape(len(digits.images), -1)
        self.svc = SVC(gamma=0.001).fit(features[train], digits.target[train])
        self.real_accuracy = float((self.svc.predict(features[test]) == digits.target[test]).mean())

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Images (N, 3, H, W) in [-1, 1] -> (N,) predicted digits."""
        return self.svc.predict(to_digit_features(images))

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """The fraction of ``images`` read as their intended ``labels`` (N,)."""
        return float((self.predict(images) == labels.numpy()).mean())
