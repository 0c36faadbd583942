"""Random augmentations for batches of chest radiographs, on the CPU or the GPU.

Each transform takes a batch ``(B, C, H, W)`` (or one image ``(C, H, W)``) on any device
and gives every sample its own random parameters, drawn in ``randomize()`` from
``self.R`` as in MONAI, so a seeded run is reproducible and the work stays on the device:
the geometry of a whole batch is one ``grid_sample``, the intensity changes are
element-wise, the blur is one grouped convolution.

What is done, and what is not, follows chest radiography:

* random resized crop, small rotation (about +-10 degrees), opt-in horizontal flip (a flip
  swaps the left and right lung, so it is off unless a config asks for it);
* brightness, contrast, gamma, Gaussian blur, Gaussian noise;
* no hue or saturation jitter and no random grayscale: the images have one channel.

Stage II of training moves the image and its lesion masks with the same geometry:
pass them together, ``affine(image, mask)``, or use :class:`RandChestAffined`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform


def _batched(image: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if image.ndim == 3:
        return image[None], True
    if image.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) or (C, H, W), got shape {tuple(image.shape)}")
    return image, False


def _check_range(name: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    a, b = (float(v) for v in value)
    if not (low <= a <= b <= high):
        raise ValueError(f"{name} must satisfy {low} <= min <= max <= {high}, got {tuple(value)}")
    return a, b


class RandChestAffine(Randomizable, Transform):
    """Per-sample random resized crop + rotation (+ optional flip) in one resampling.

    Args:
        output_size: ``(rows, columns)`` of the output; None keeps the input size.
        scale: range of the crop's area as a fraction of the image.
        ratio: range of the crop's aspect ratio (width / height).
        rotate_degrees: largest rotation either way.
        flip_prob: probability of a horizontal flip (swaps the lungs; off by default).
        prob: probability that a sample is transformed at all.
    """

    def __init__(
        self,
        output_size: Sequence[int] | None = None,
        scale: Sequence[float] = (0.6, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        rotate_degrees: float = 10.0,
        flip_prob: float = 0.0,
        prob: float = 1.0,
    ) -> None:
        self.output_size = tuple(output_size) if output_size is not None else None
        self.scale = _check_range("scale", scale, 1e-3, 1.0)
        self.ratio = _check_range("ratio", ratio, 1e-2, 1e2)
        if not 0 <= rotate_degrees <= 180:
            raise ValueError(f"rotate_degrees must be in [0, 180], got {rotate_degrees}")
        self.rotate_degrees = float(rotate_degrees)
        self.flip_prob = float(flip_prob)
        self.prob = float(prob)
        self._params: dict[str, np.ndarray] | None = None

    def randomize(self, batch_size: int) -> None:
        keep = self.R.random_sample(batch_size) >= self.prob
        area = np.where(keep, 1.0, self.R.uniform(*self.scale, batch_size))
        log_ratio = self.R.uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), batch_size)
        position = self.R.uniform(-1.0, 1.0, (batch_size, 2))
        angle = np.deg2rad(self.R.uniform(-self.rotate_degrees, self.rotate_degrees, batch_size))
        flip = self.R.random_sample(batch_size) < self.flip_prob
        angle[keep], flip[keep] = 0.0, False
        self._params = dict(
            area=area, log_ratio=log_ratio, keep=keep, position=position, angle=angle, flip=flip
        )

    def theta(self, height: int, width: int) -> np.ndarray:
        """``(B, 2, 3)`` affine from output to input normalised coordinates (``affine_grid``).

        Crop area and aspect ratio are in pixels, as in torchvision's RandomResizedCrop;
        the rotation is a true rotation in pixel space, whatever the image's aspect.
        """
        if self._params is None:
            raise RuntimeError("call randomize() first")
        p = self._params
        aspect = width / height
        # Crop half-extents as fractions of the image (normalised [-1, 1] spans it).
        pixel_ratio = np.where(p["keep"], aspect, np.exp(p["log_ratio"]))
        half_w = np.minimum(np.sqrt(p["area"] * pixel_ratio / aspect), 1.0)
        half_h = np.minimum(np.sqrt(p["area"] * aspect / pixel_ratio), 1.0)
        cos, sin = np.cos(p["angle"]), np.sin(p["angle"])
        sx = half_w * np.where(p["flip"], -1.0, 1.0)
        theta = np.zeros((len(cos), 2, 3), np.float32)
        theta[:, 0, 0] = cos * sx
        theta[:, 0, 1] = -sin * half_h / aspect
        theta[:, 1, 0] = sin * sx * aspect
        theta[:, 1, 1] = cos * half_h
        theta[:, 0, 2] = p["position"][:, 0] * (1.0 - half_w)
        theta[:, 1, 2] = p["position"][:, 1] * (1.0 - half_h)
        return theta

    def __call__(self, image: torch.Tensor, *others: torch.Tensor, randomize: bool = True):
        """Transform ``image`` and, with the same geometry, every tensor in ``others``.

        Returns the transformed image, or a tuple ``(image, *others)`` when others are given.
        """
        batch, squeezed = _batched(image)
        extra = [_batched(o)[0] for o in others]
        if randomize:
            self.randomize(batch.shape[0])
        rows, columns = self.output_size or batch.shape[-2:]
        theta = torch.as_tensor(self.theta(batch.shape[-2], batch.shape[-1]), device=batch.device)
        grid = F.affine_grid(
            theta.to(batch.dtype), [batch.shape[0], 1, rows, columns], align_corners=False
        )
        stacked = torch.cat([batch, *[e.to(batch.dtype) for e in extra]], dim=1) if extra else batch
        out = F.grid_sample(
            stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        parts = torch.split(out, [batch.shape[1], *[e.shape[1] for e in extra]], dim=1)
        parts = [p[0] if squeezed else p for p in parts]
        return parts[0] if not others else tuple(parts)


class RandChestIntensity(Randomizable, Transform):
    """Per-sample gamma, contrast, brightness, Gaussian blur and Gaussian noise, in that order.

    Images are expected in [0, 1] and stay there.

    Args:
        gamma: range of the exponent applied to intensities.
        contrast: range of the factor applied around each image's mean.
        brightness: largest additive shift either way.
        blur_prob, blur_sigma: probability and range of the Gaussian blur's sigma (pixels).
        noise_prob, noise_std: probability and range of the additive noise's std.
    """

    def __init__(
        self,
        gamma: Sequence[float] = (0.7, 1.5),
        contrast: Sequence[float] = (0.75, 1.33),
        brightness: float = 0.1,
        blur_prob: float = 0.3,
        blur_sigma: Sequence[float] = (0.2, 1.5),
        noise_prob: float = 0.3,
        noise_std: Sequence[float] = (0.0, 0.03),
    ) -> None:
        self.gamma = _check_range("gamma", gamma, 1e-2, 1e2)
        self.contrast = _check_range("contrast", contrast, 0.0, 1e2)
        self.brightness = float(brightness)
        self.blur_prob = float(blur_prob)
        self.blur_sigma = _check_range("blur_sigma", blur_sigma, 0.0, 20.0)
        self.noise_prob = float(noise_prob)
        self.noise_std = _check_range("noise_std", noise_std, 0.0, 1.0)
        self._params: dict[str, np.ndarray] | None = None

    def randomize(self, batch_size: int) -> None:
        r = self.R
        log_gamma = r.uniform(math.log(self.gamma[0]), math.log(self.gamma[1]), batch_size)
        sigma = np.where(
            r.random_sample(batch_size) < self.blur_prob,
            r.uniform(*self.blur_sigma, batch_size),
            0.0,
        )
        noise = np.where(
            r.random_sample(batch_size) < self.noise_prob,
            r.uniform(*self.noise_std, batch_size),
            0.0,
        )
        self._params = dict(
            gamma=np.exp(log_gamma),
            contrast=r.uniform(*self.contrast, batch_size),
            brightness=r.uniform(-self.brightness, self.brightness, batch_size),
            sigma=sigma,
            noise=noise,
            seed=np.array([r.randint(0, 2**31 - 1)]),
        )

    def __call__(self, image: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        batch, squeezed = _batched(image)
        if randomize:
            self.randomize(batch.shape[0])
        if self._params is None:
            raise RuntimeError("call randomize() first")
        p = {
            k: torch.as_tensor(v, device=batch.device, dtype=batch.dtype)
            for k, v in self._params.items()
            if k != "seed"
        }
        shape = (-1, 1, 1, 1)
        x = batch.clamp(1e-6, 1.0) ** p["gamma"].view(shape)
        mean = x.mean(dim=(-2, -1), keepdim=True)
        x = (x - mean) * p["contrast"].view(shape) + mean + p["brightness"].view(shape)
        if bool((self._params["sigma"] > 0).any()):
            x = gaussian_blur(x, p["sigma"])
        if bool((self._params["noise"] > 0).any()):
            generator = torch.Generator(device=batch.device).manual_seed(
                int(self._params["seed"][0])
            )
            noise = torch.randn(x.shape, generator=generator, device=batch.device, dtype=x.dtype)
            x = x + noise * p["noise"].view(shape)
        x = x.clamp(0.0, 1.0)
        return x[0] if squeezed else x


def gaussian_blur(batch: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each sample with its own ``sigma`` (pixels; 0 leaves it unchanged), reflect padding.

    One separable grouped convolution for the whole batch.
    """
    b, c, h, w = batch.shape
    radius = max(1, int(math.ceil(3.0 * float(sigma.max()))))
    offsets = torch.arange(-radius, radius + 1, device=batch.device, dtype=batch.dtype)
    s = sigma.view(-1, 1).clamp_min(1e-3)
    kernel = torch.exp(-0.5 * (offsets / s) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (offsets == 0).to(batch.dtype).expand_as(kernel)
    kernel = torch.where(sigma.view(-1, 1) > 0, kernel, identity)  # (B, K)
    kernel = kernel.repeat_interleave(c, dim=0)  # one kernel per (sample, channel)
    x = batch.reshape(1, b * c, h, w)
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(b * c, 1, 1, -1), groups=b * c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return x.view(b, c, h, w)


class _SharesRandomState(Randomizable):
    """A wrapper whose randomness lives in inner transforms that share its ``R``.

    Seeding the wrapper seeds them all with one stream; they draw their own
    parameters, so ``randomize`` has nothing to do here.
    """

    _inner: tuple[str, ...] = ()

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        for name in self._inner:
            getattr(self, name).set_random_state(state=self.R)
        return self

    def randomize(self, data=None) -> None:
        return None


class SimCLRViews(_SharesRandomState, Transform):
    """Two independently augmented views of every image in a batch (SimCLR stage I)."""

    _inner = ("affine", "intensity")

    def __init__(
        self, affine: RandChestAffine | None = None, intensity: RandChestIntensity | None = None
    ) -> None:
        self.affine = affine or RandChestAffine()
        self.intensity = intensity or RandChestIntensity()

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.intensity(self.affine(batch)), self.intensity(self.affine(batch))


class RandChestAffined(_SharesRandomState, MapTransform):
    """Apply one :class:`RandChestAffine` draw to all ``keys`` (image and masks move together)."""

    _inner = ("affine",)

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.affine = RandChestAffine(**kwargs)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        out = self.affine(d[keys[0]], *[d[k] for k in keys[1:]])
        for key, value in zip(keys, out if len(keys) > 1 else (out,)):
            d[key] = value
        return d


class RandChestIntensityd(_SharesRandomState, MapTransform):
    """Apply :class:`RandChestIntensity` to each of ``keys`` (images only, never masks)."""

    _inner = ("intensity",)

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.intensity = RandChestIntensity(**kwargs)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.intensity(d[key])
        return d
