"""avLandmarkGAN networks (Wang et al., "Towards the Synthesis of Parent-Infant
Facial Interactions", 2021) and the ResNet-18 VA judge used to evaluate them.

Two conditional GANs, each a generator and a discriminator:

* landmark converter  -- ``LandmarkGenerator`` / ``LandmarkDiscriminator``:
  136 landmark coordinates + target valence/arousal -> 136 new coordinates.
* image converter     -- ``ImageGenerator`` / ``ImageDiscriminator``: a
  StarGAN-style (Choi et al. 2018) encoder / residual bottleneck / decoder
  that takes the face, the target landmarks drawn on a white image and the
  target VA; its PatchGAN discriminator also regresses VA and the 136
  landmark coordinates.

Conventions shared by every module here and by ``losses.py``:

* A landmark vector is (B, 136) laid out like OpenFace's columns:
  ``[x_0 .. x_67, y_0 .. y_67]`` (0-based iBUG-68 indices), in normalised
  coordinates (the training data code decides the normalisation, e.g. image
  coordinates of the 64/128 px crop mapped to [-1, 1]). ``to_vector`` /
  ``to_points`` convert to and from (B, 68, 2).
* VA conditions ``c`` are (B, 2) = (valence, arousal) in [-1, 1].
* Images are (B, C, H, W) in [-1, 1], C = 3 (RGB) or 1 (luminance); the landmark image is (B, 1, H, W) in
  [-1, 1] (white background = +1, drawn landmarks darker).

Image sizes: 128x128 is the paper's configuration (``image_size=128``,
discriminator ``repeat_num=6``), the served one, with GANimation's attention
mask; 64x64 (``repeat_num=5``) is where it was first trained on CPU. The
generator is fully convolutional, so a 64 px generator's weights start a
128 px run (resolution transfer, models/synth/MODEL_CARD.md); the
discriminator's heads depend on the side. Its ``repeat_num`` must leave a
spatial size of at least 1: ``image_size / 2**repeat_num`` (2 in both
configurations above).

Every module has ``count_params()``; ``count_params(module)`` works on any
``nn.Module``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

N_POINTS = 68
LANDMARK_DIM = 2 * N_POINTS  # 136
VA_DIM = 2


def count_params(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def to_vector(points: torch.Tensor) -> torch.Tensor:
    """(B, 68, 2) points -> (B, 136) vector ``[x_0..x_67, y_0..y_67]``."""
    return torch.cat([points[..., 0], points[..., 1]], dim=-1)


def to_points(vector: torch.Tensor) -> torch.Tensor:
    """(B, 136) vector ``[x_0..x_67, y_0..y_67]`` -> (B, 68, 2) points."""
    return torch.stack([vector[..., :N_POINTS], vector[..., N_POINTS:]], dim=-1)


class _Counted(nn.Module):
    def count_params(self, trainable_only: bool = True) -> int:
        return count_params(self, trainable_only)


def _init_gan(module: nn.Module) -> None:
    """DCGAN-style init for the GAN modules: N(0, 0.02) weights, zero biases,
    unit-scale norm affines. (StarGAN keeps PyTorch's defaults; the small
    normal init is the common, stable choice for GANs and keeps the landmark
    generator's residual output close to the identity at the start.)"""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.InstanceNorm2d, nn.BatchNorm2d, nn.LayerNorm)):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------
# Landmark converter
# ---------------------------------------------------------------------------
class _MLPBlock(nn.Module):
    """Pre-activation residual MLP block: h + W2 relu(W1 relu(h))."""

    def __init__(self, dim: int, slope: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.slope = slope

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        d = self.fc1(F.leaky_relu(h, self.slope))
        d = self.fc2(F.leaky_relu(d, self.slope))
        return h + d


class LandmarkGenerator(_Counted):
    """G_l(x, c) -> y: move 68 landmarks to express valence/arousal ``c``.

    ``forward(x: (B,136), c: (B,2)) -> (B,136)``.

    An MLP on ``[x, c]`` (138 inputs) -> ``hidden`` -> ``layers`` residual
    blocks (two Linear layers each) -> 136 outputs, ReLU activations.

    The output is ``x + delta``: an expression change is a small displacement
    of the points, and the face's identity/pose (everything the displacement
    leaves alone) is kept by construction instead of having to be re-learnt
    through the bottleneck. With the small init the generator starts close to
    the identity map, where the reconstruction and face-feature-centre losses
    are already near zero, and the adversarial and emotion losses pull it
    away only as far as the expression requires.
    """

    def __init__(self, hidden: int = 256, layers: int = 3):
        super().__init__()
        self.inp = nn.Linear(LANDMARK_DIM + VA_DIM, hidden)
        self.blocks = nn.Sequential(*[_MLPBlock(hidden, 0.0) for _ in range(layers)])
        self.out = nn.Linear(hidden, LANDMARK_DIM)
        _init_gan(self)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.inp(torch.cat([x, c], dim=1))
        h = F.relu(self.blocks(h))
        return x + self.out(h)


class LandmarkDiscriminator(_Counted):
    """D_l(x) -> (src, va): real/fake logit and VA regression of 136 landmarks.

    ``forward(x: (B,136)) -> (src (B,1), va (B,2))``.

    MLP 136 -> ``hidden`` -> ``layers`` residual blocks, LeakyReLU(0.2), no
    normalisation (so the gradient penalty stays valid if WGAN-GP is used),
    two linear heads. ``src`` is an unbounded score (a logit for the paper's
    GAN loss, a critic value for WGAN-GP); ``va`` is unbounded too, so the
    L2 emotion loss never saturates at the ends of [-1, 1].
    """

    def __init__(self, hidden: int = 256, layers: int = 2):
        super().__init__()
        self.inp = nn.Linear(LANDMARK_DIM, hidden)
        self.blocks = nn.Sequential(*[_MLPBlock(hidden, 0.2) for _ in range(layers)])
        self.src = nn.Linear(hidden, 1)
        self.va = nn.Linear(hidden, VA_DIM)
        _init_gan(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.leaky_relu(self.blocks(self.inp(x)), 0.2)
        return self.src(h), self.va(h)


# ---------------------------------------------------------------------------
# Image converter (StarGAN generator / PatchGAN discriminator)
# ---------------------------------------------------------------------------
def _inorm(ch: int) -> nn.InstanceNorm2d:
    # StarGAN uses track_running_stats=True, which makes eval() switch to
    # running averages and changes the output between train and eval; plain
    # per-image statistics behave the same in both modes.
    return nn.InstanceNorm2d(ch, affine=True, track_running_stats=False)


class ResidualBlock(nn.Module):
    """conv3x3-IN-ReLU-conv3x3-IN plus identity (StarGAN's bottleneck block)."""

    def __init__(self, dim: int):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(dim, dim, 3, 1, 1, bias=False),
            _inorm(dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 3, 1, 1, bias=False),
            _inorm(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.main(x)


class ImageGenerator(_Counted):
    """G_i(face, landmark_image, c) -> face with the target expression.

    ``forward(face: (B,C,H,W), lm_image: (B,1,H,W), c: (B,2)) -> (B,C,H,W)``
    with all images in [-1, 1], H = W = ``image_size`` and C = ``channels``
    (3: RGB; 1: luminance, the colour being carried from the input by the
    caller, see ``colour.py``).

    StarGAN's generator with a (C + 3)-channel input: the face (C), the target
    landmarks drawn on a white image (1), and ``c`` broadcast to 2 constant
    channels (as StarGAN broadcasts its domain label). Then conv7x7 ->
    2 down-sampling convs (4x4, stride 2, channels x2) -> ``repeat_num``
    residual blocks -> 2 up-sampling transposed convs -> conv7x7; instance
    norm + ReLU throughout. ``image_size`` is only checked (the net is fully
    convolutional; sides must be divisible by 4).

    ``attention=True`` is GANimation's generator (Pumarola et al. 2018, Eq. 1
    and Fig. 3): the last conv has one more channel, an attention mask
    A = sigmoid(.) in [0, 1], beside the colour image C = tanh(.), and the
    output is

        G(x) = A * x + (1 - A) * C,

    so wherever A = 1 the input pixel is copied as it is: only what the
    expression changes is redrawn. ``parts`` returns (output, C, A);
    ``attention=False`` is the paper's plain generator (output = C, A None).
    """

    def __init__(
        self,
        image_size: int = 64,
        conv_dim: int = 32,
        repeat_num: int = 3,
        channels: int = 3,
        attention: bool = False,
    ):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")
        self.image_size = image_size
        self.channels = channels
        self.attention = attention
        in_ch = channels + 1 + VA_DIM
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, conv_dim, 7, 1, 3, bias=False),
            _inorm(conv_dim),
            nn.ReLU(inplace=True),
        ]
        d = conv_dim
        for _ in range(2):
            layers += [nn.Conv2d(d, d * 2, 4, 2, 1, bias=False), _inorm(d * 2), nn.ReLU(inplace=True)]
            d *= 2
        layers += [ResidualBlock(d) for _ in range(repeat_num)]
        for _ in range(2):
            layers += [
                nn.ConvTranspose2d(d, d // 2, 4, 2, 1, bias=False),
                _inorm(d // 2),
                nn.ReLU(inplace=True),
            ]
            d //= 2
        # colour C (and the attention mask A): one conv, split in `parts`
        layers += [nn.Conv2d(d, channels + int(attention), 7, 1, 3, bias=False)]
        self.main = nn.Sequential(*layers)
        _init_gan(self)

    def parts(
        self, face: torch.Tensor, lm_image: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(output, colour C, attention A or None); see the class docstring."""
        b, ch, h, w = face.shape
        if ch != self.channels:
            raise ValueError(f"face must have {self.channels} channel(s), got {ch}")
        if lm_image.shape != (b, 1, h, w):
            raise ValueError(f"lm_image must be {(b, 1, h, w)}, got {tuple(lm_image.shape)}")
        c_map = c.view(b, VA_DIM, 1, 1).expand(b, VA_DIM, h, w)
        out = self.main(torch.cat([face, lm_image, c_map], dim=1))
        colour = torch.tanh(out[:, : self.channels])
        if not self.attention:
            return colour, colour, None
        A = torch.sigmoid(out[:, self.channels :])
        return A * face + (1 - A) * colour, colour, A

    def forward(self, face: torch.Tensor, lm_image: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.parts(face, lm_image, c)[0]


class ImageDiscriminator(_Counted):
    """D_i(image) -> (src, va, landmarks).

    ``forward(x: (B,C,H,W)) -> (src (B,1,h,w), va (B,2), lm (B,136))`` with
    h = w = image_size / 2**repeat_num and C = ``channels``.

    StarGAN's PatchGAN: ``repeat_num`` convs 4x4 stride 2 (channels
    conv_dim, x2 each layer, at most ``max_dim`` when it is set),
    LeakyReLU(0.01), no normalisation. Heads on the
    last feature map: ``src`` a 3x3 conv to one channel (a real/fake score per
    patch); ``va`` and ``lm`` convs whose kernel is the whole remaining
    spatial size (StarGAN's classification head), to 2 and 136 channels.
    Outputs are unbounded (logits / regression values).
    """

    def __init__(
        self,
        image_size: int = 64,
        conv_dim: int = 32,
        repeat_num: int = 5,
        channels: int = 3,
        max_dim: int = 0,
    ):
        super().__init__()
        k = image_size // 2**repeat_num
        if k < 1 or image_size % 2**repeat_num:
            raise ValueError(f"image_size {image_size} must be a multiple of 2**repeat_num ({2**repeat_num})")
        layers: list[nn.Module] = [nn.Conv2d(channels, conv_dim, 4, 2, 1), nn.LeakyReLU(0.01)]
        d = conv_dim
        for _ in range(1, repeat_num):
            d_next = min(d * 2, max_dim) if max_dim else d * 2
            layers += [nn.Conv2d(d, d_next, 4, 2, 1), nn.LeakyReLU(0.01)]
            d = d_next
        self.main = nn.Sequential(*layers)
        self.src = nn.Conv2d(d, 1, 3, 1, 1, bias=False)
        self.va = nn.Conv2d(d, VA_DIM, k, bias=False)
        self.lm = nn.Conv2d(d, LANDMARK_DIM, k, bias=False)
        self.image_size = image_size
        self.patch_size = k
        _init_gan(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.main(x)
        return self.src(h), self.va(h).flatten(1), self.lm(h).flatten(1)


# ---------------------------------------------------------------------------
# VA judge: ResNet-18 regressor
# ---------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN with a (projected) identity shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class VAJudge(_Counted):
    """Independent ResNet-18 valence/arousal regressor (the paper's evaluator).

    ``forward(x: (B,3,H,W)) -> va (B,2)`` in [-1, 1] (tanh);
    ``features(x) -> (B, base*8)`` global-average-pooled features (512-d for
    the default ``base=64``), used for the Fréchet distance.

    He et al.'s ResNet-18: stem conv7x7/2-BN-ReLU-maxpool3x3/2, four stages
    of ``blocks`` BasicBlocks ([2, 2, 2, 2]) with widths base x (1, 2, 4, 8),
    stages 2-4 starting with stride 2, global average pool, linear head.
    Works for any input side >= 32 (64 px leaves a 2x2 map, 128 px 4x4).

    Written here rather than imported: torchvision (which has
    ``resnet18``) cannot be installed beside the pinned CPU torch build, and
    the network is ~60 lines.
    """

    def __init__(self, base: int = 64, blocks: tuple[int, ...] = (2, 2, 2, 2), in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, base, 7, 2, 3, bias=False),
            nn.BatchNorm2d(base),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages = []
        c_in = base
        for i, n in enumerate(blocks):
            c_out = base * 2**i
            stage = [BasicBlock(c_in, c_out, 1 if i == 0 else 2)]
            stage += [BasicBlock(c_out, c_out) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.feature_dim = c_in
        self.head = nn.Linear(c_in, VA_DIM)
        for m in self.modules():  # torchvision's ResNet init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        return torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.features(x)))
