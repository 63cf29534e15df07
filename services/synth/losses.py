"""avLandmarkGAN losses (Wang et al. 2021, Sec. III, Eqs. 1-10).

Notation: x real input, c_e target VA, c'_e the input's own VA, G generator,
D discriminator; E[.] is a mean over the batch. Every reduction is stated in
the docstring; all are means, so the loss weights do not depend on batch
size, image size or number of patches.

Adversarial loss -- which one
-----------------------------
The paper writes the vanilla GAN objective (Eqs. 1 and 6, "similar to the
vanilla adversarial loss [18]")

    L_adv = E_x[log D(x)] + E_{x,c}[log(1 - D(G(x, c)))]

with L_D = -L_adv + ... and L_G = L_adv + ... (Eqs. 5 and 10), and never
mentions a gradient penalty. That is the default here (``adv="gan"``), with
D's ``src`` output read as a logit (D(x) = sigmoid(src)):

* ``gan_d_loss`` = -L_adv exactly (binary cross-entropy with logits);
* ``gan_g_loss`` = the non-saturating generator form -E[log D(G(x, c))]
  (Goodfellow et al. 2014, Sec. 3): same fixed point as minimising
  E[log(1 - D(G))], but it does not vanish when D wins early.
  ``saturating=True`` gives the literal E[log(1 - D(G(x, c)))].

StarGAN, on which the image converter is built, writes the same vanilla
equation but trains with WGAN-GP; it is available as ``adv="wgan-gp"``
(``wgan_d_loss``, ``wgan_g_loss``, ``gradient_penalty``, λ_gp = 10 as in
StarGAN) should the vanilla loss prove unstable.

Weights: ``Lambdas``, one place for every λ, with the paper's names;
``PAPER_LAMBDAS`` holds the paper's values (Sec. IV-A): λ_e = 5 (both
converters), λ_rec = 10, λ_ffc = 10, λ_l = 10; and StarGAN's λ_gp = 10.

Every option of a loss (``adv``, ``saturating``, ``alpha``, ``lambdas``,
``gp``) is keyword-only; only the tensors are positional.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .model import N_POINTS

# 0-based iBUG-68 groups of the face-feature-centre loss (paper Sec. III-A-4).
LANDMARK_GROUPS: dict[str, range] = {
    "jaw": range(0, 17),
    "right_brow": range(17, 22),
    "left_brow": range(22, 27),
    "nose": range(27, 36),
    "right_eye": range(36, 42),
    "left_eye": range(42, 48),
    "mouth": range(48, 68),
}

ADV_MODES = ("gan", "wgan-gp")


@dataclasses.dataclass(frozen=True)
class Lambdas:
    """The loss weights of Eqs. 5 and 10 (and of WGAN-GP's penalty).

    The landmark objectives read lambda_e, lambda_rec and lambda_ffc, the
    image objectives lambda_e, lambda_l and lambda_rec, both D objectives
    lambda_gp under ``adv="wgan-gp"``. The defaults are the paper's."""

    lambda_e: float = 5.0  # λ_e: emotion (VA) regression, L_e (Eqs. 2, 7)
    lambda_rec: float = 10.0  # λ_rec: cycle reconstruction, L_rec (Eqs. 3, 9)
    lambda_ffc: float = 10.0  # λ_ffc: face-feature centres, L_ffc (Eq. 4)
    lambda_l: float = 10.0  # λ_l: landmark regression by D_i, L_l (Eq. 8)
    lambda_mask: float = 0.0  # λ_A: sparsity of the change, L_A (GANimation's mask; 0 = no mask)
    lambda_tv: float = 0.0  # λ_TV: total variation of the mask (GANimation)
    lambda_gp: float = 10.0  # λ_gp: gradient penalty (StarGAN; WGAN-GP only)


#: the paper's weights (Sec. IV-A)
PAPER_LAMBDAS = Lambdas()


# ---------------------------------------------------------------------------
# adversarial
# ---------------------------------------------------------------------------
def gan_d_loss(real_src: torch.Tensor, fake_src: torch.Tensor) -> torch.Tensor:
    """-L_adv = -E[log σ(D(x))] - E[log(1 - σ(D(G(x,c))))].

    ``real_src``/``fake_src`` are logits of any shape ((B,1) or a PatchGAN
    map (B,1,h,w)); each expectation is the mean over all elements (batch and
    patches). Computed stably as BCE-with-logits (real -> 1, fake -> 0).
    """
    return F.binary_cross_entropy_with_logits(
        real_src, torch.ones_like(real_src)
    ) + F.binary_cross_entropy_with_logits(fake_src, torch.zeros_like(fake_src))


def gan_g_loss(fake_src: torch.Tensor, *, saturating: bool = False) -> torch.Tensor:
    """Generator's adversarial term (mean over batch and patches).

    Default (non-saturating): -E[log σ(D(G(x,c)))].
    ``saturating=True``: E[log(1 - σ(D(G(x,c))))], the fake half of L_adv
    exactly as written in Eqs. 1/6 (minimised by G).
    """
    if saturating:
        return -F.binary_cross_entropy_with_logits(fake_src, torch.zeros_like(fake_src))
    return F.binary_cross_entropy_with_logits(fake_src, torch.ones_like(fake_src))


def wgan_d_loss(real_src: torch.Tensor, fake_src: torch.Tensor) -> torch.Tensor:
    """WGAN critic loss -E[D(x)] + E[D(G(x,c))] (means over batch and patches)."""
    return fake_src.mean() - real_src.mean()


def wgan_g_loss(fake_src: torch.Tensor) -> torch.Tensor:
    """WGAN generator loss -E[D(G(x,c))]."""
    return -fake_src.mean()


def interpolate(real: torch.Tensor, fake: torch.Tensor, *, alpha: torch.Tensor | None = None) -> torch.Tensor:
    """x̂ = α·real + (1-α)·fake with one α ~ U[0,1] per sample (StarGAN),
    detached from both inputs and marked ``requires_grad`` for the penalty."""
    if alpha is None:
        alpha = torch.rand(real.size(0), *([1] * (real.dim() - 1)), device=real.device)
    return (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)


def gradient_penalty(src: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Gulrajani et al. 2017: E_x̂[(‖∇_x̂ D(x̂)‖_2 - 1)^2].

    ``src`` = D(x̂) (any shape; its sum over non-batch elements, i.e. over
    PatchGAN patches, is differentiated, as in StarGAN), ``x_hat`` the input
    with ``requires_grad``. The gradient norm is taken per sample over all
    of its elements; the mean is over the batch.
    """
    (grad,) = torch.autograd.grad(
        outputs=src,
        inputs=x_hat,
        grad_outputs=torch.ones_like(src),
        create_graph=True,
        retain_graph=True,
        only_inputs=True,
    )
    norm = grad.flatten(1).norm(2, dim=1)
    return ((norm - 1) ** 2).mean()


def d_adversarial(real_src, fake_src, *, adv: str = "gan") -> torch.Tensor:
    """The discriminator's adversarial term for ``adv`` in ADV_MODES."""
    if adv == "gan":
        return gan_d_loss(real_src, fake_src)
    if adv == "wgan-gp":
        return wgan_d_loss(real_src, fake_src)
    raise ValueError(f"adv must be one of {ADV_MODES}, got {adv!r}")


def g_adversarial(fake_src, *, adv: str = "gan") -> torch.Tensor:
    """The generator's adversarial term for ``adv`` in ADV_MODES."""
    if adv == "gan":
        return gan_g_loss(fake_src)
    if adv == "wgan-gp":
        return wgan_g_loss(fake_src)
    raise ValueError(f"adv must be one of {ADV_MODES}, got {adv!r}")


# ---------------------------------------------------------------------------
# conditional terms
# ---------------------------------------------------------------------------
def emotion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L2 emotion regression (Eqs. 2, 7): mean((pred - target)^2).

    ``pred``, ``target`` (B, 2) valence/arousal; the mean is over the batch
    and the 2 dimensions (the paper concatenates and flattens the VA vectors
    for the regression loss, Sec. IV-A). Used with target = true VA c'_e on
    real inputs (L_e^real, D's term) and target = c_e on fakes (L_e^fake,
    G's term).
    """
    return F.mse_loss(pred, target)


def reconstruction_loss(x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Cycle reconstruction L1 (Eqs. 3, 9): mean |x - G(G(x, c_e), c'_e)|.

    Mean over every element (batch x 136 coordinates, or batch x 3 x H x W
    pixels), as StarGAN's L_rec.
    """
    return (x_rec - x).abs().mean()


def landmark_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Landmark L1 of the image discriminator's landmark head (Eq. 8):
    mean |D_lm(image) - landmarks| over batch and the 136 coordinates.
    Target = the real image's own landmarks c'_l for L_l^real, the target
    landmarks c_l the fake was generated from for L_l^fake."""
    return (pred - target).abs().mean()


def group_centres(lm: torch.Tensor) -> torch.Tensor:
    """(B, 136) ``[x_0..x_67, y_0..y_67]`` -> (B, 7, 2) centres h_j: the mean
    (x, y) of each group's points, groups in ``LANDMARK_GROUPS`` order."""
    pts = torch.stack([lm[:, :N_POINTS], lm[:, N_POINTS:]], dim=-1)  # (B, 68, 2)
    return torch.stack([pts[:, list(idx)].mean(dim=1) for idx in LANDMARK_GROUPS.values()], dim=1)


def ffc_loss(fake_lm: torch.Tensor, real_lm: torch.Tensor) -> torch.Tensor:
    """Face-feature-centre L1 (Eq. 4):

        L_ffc = mean over batch b, groups j (7) and coordinates k (x, y) of
                |h_j(real)_k - h_j(fake)_k|

    where h_j is the mean of group j's points (``group_centres``). This is
    the paper's E_b[Σ_j ‖h_j(x) - h_j(G(x, c))‖_1] divided by 14 (7 groups
    x 2 coordinates), the same mean-over-elements normalisation as the L1
    reconstruction loss beside which λ_ffc = λ_rec = 10 weight it. Points
    moving inside a group without moving its centre cost nothing.
    """
    return (group_centres(fake_lm) - group_centres(real_lm)).abs().mean()


# ---------------------------------------------------------------------------
# full objectives (Eqs. 5 and 10)
# ---------------------------------------------------------------------------
def _objective(
    adv_term: torch.Tensor, /, **weighted: tuple[float, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """adv_term + Σ λ·term over ``weighted`` (name=(λ, term)), added in that
    order. Returns (total, {"adv": value, name: value, ...}) for logging."""
    total = adv_term
    for lam, term in weighted.values():
        total = total + lam * term
    terms = {"adv": adv_term, **{name: term for name, (_, term) in weighted.items()}}
    return total, {k: float(v.detach()) for k, v in terms.items()}


def _d_objective(
    adv_term: torch.Tensor,
    /,
    *,
    adv: str,
    gp: torch.Tensor | None,
    lambda_gp: float,
    **weighted: tuple[float, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, float]]:
    """A discriminator's ``_objective``, + λ_gp·GP last when adv="wgan-gp"."""
    if adv == "wgan-gp":
        if gp is None:
            raise ValueError("adv='wgan-gp' needs gp=gradient_penalty(...)")
        weighted["gp"] = (lambda_gp, gp)
    return _objective(adv_term, **weighted)


def landmark_d_objective(
    real_src,
    fake_src,
    real_va_pred,
    real_va,
    *,
    lambdas: Lambdas = PAPER_LAMBDAS,
    adv: str = "gan",
    gp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_{D_l} = -L_adv + λ_e L_e^real  (+ λ_gp GP when adv="wgan-gp").

    Returns (total, {term: value}) for logging. ``gp`` is required for
    WGAN-GP and ignored otherwise.
    """
    return _d_objective(
        d_adversarial(real_src, fake_src, adv=adv),
        adv=adv,
        gp=gp,
        lambda_gp=lambdas.lambda_gp,
        e_real=(lambdas.lambda_e, emotion_loss(real_va_pred, real_va)),
    )


def landmark_g_objective(
    fake_src, fake_va_pred, c_e, x_rec, x, fake_lm, *, lambdas: Lambdas = PAPER_LAMBDAS, adv: str = "gan"
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_{G_l} = L_adv + λ_e L_e^fake + λ_rec L_rec + λ_ffc L_ffc.

    fake_src, fake_va_pred = D_l(G_l(x, c_e)); x_rec = G_l(G_l(x, c_e), c'_e);
    fake_lm = G_l(x, c_e) (compared with x by the face-feature-centre loss).
    """
    return _objective(
        g_adversarial(fake_src, adv=adv),
        e_fake=(lambdas.lambda_e, emotion_loss(fake_va_pred, c_e)),
        rec=(lambdas.lambda_rec, reconstruction_loss(x_rec, x)),
        ffc=(lambdas.lambda_ffc, ffc_loss(fake_lm, x)),
    )


def image_d_objective(
    real_src,
    fake_src,
    real_va_pred,
    real_va,
    real_lm_pred,
    real_lm,
    *,
    lambdas: Lambdas = PAPER_LAMBDAS,
    adv: str = "gan",
    gp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_{D_i} = -L_adv + λ_e L_e^real + λ_l L_l^real  (+ λ_gp GP for WGAN-GP).

    real_src, real_va_pred, real_lm_pred = D_i(x); fake_src = D_i(G_i(...)).
    """
    return _d_objective(
        d_adversarial(real_src, fake_src, adv=adv),
        adv=adv,
        gp=gp,
        lambda_gp=lambdas.lambda_gp,
        e_real=(lambdas.lambda_e, emotion_loss(real_va_pred, real_va)),
        l_real=(lambdas.lambda_l, landmark_loss(real_lm_pred, real_lm)),
    )


def mask_sparsity(A: torch.Tensor, *, budget: float = 0.0, floor: float = 0.0) -> torch.Tensor:
    """E_images[max(0, r - budget) + max(0, floor - r)], r = mean(1 - A) over
    an image's pixels: the share of it the generator redraws, held inside
    [floor, budget] (budget 0 and floor 0: the plain mean E[1 - A]).

    GANimation (Pumarola et al. 2018, Eq. 5) penalises E[A] to keep its mask
    from saturating at "copy the input" -- the easy solution that satisfies
    the cycle and adversarial losses at once. Here the other direction
    matters too: a face that is redrawn everywhere is no longer the person
    (the plain generator's outputs are half the time another person to
    dlib). Between floor and budget the generator chooses freely where to
    spend the area (the emotion and landmark losses decide), and the colour
    it draws where nothing should change is held to the input by the cycle
    loss.

    This term alone does not keep a mask open. Trials on this data (128 px,
    luminance, from scratch): a plain penalty on 1 - A (weight 1) closed the
    mask to 4.6 % of the crop within 100 steps, a 12 % ceiling alone to
    1.6 % by step 200, and a [6 %, 15 %] hinge held it at the floor with the
    outputs unchanged -- in all three, outputs were judged exactly like
    their inputs. What opened it is the curriculum in the model card: start
    from an expressive plain generator (solver.init_from_snapshot) and
    weight the emotion term above the cycle term."""
    share = (1 - A).flatten(1).mean(dim=1)
    return (F.relu(share - budget) + F.relu(floor - share)).mean()


def mask_tv(A: torch.Tensor) -> torch.Tensor:
    """Total variation of the mask, mean |A(i+1, j) - A(i, j)| + mean
    |A(i, j+1) - A(i, j)| (GANimation's smoothness term, as a mean of L1
    differences): a mask in smooth blobs, not in speckles."""
    return (A[..., 1:, :] - A[..., :-1, :]).abs().mean() + (A[..., 1:] - A[..., :-1]).abs().mean()


def image_g_objective(
    fake_src,
    fake_va_pred,
    c_e,
    fake_lm_pred,
    c_l,
    x_rec,
    x,
    *,
    masks: tuple[torch.Tensor, ...] = (),
    mask_budget: float = 0.0,
    mask_floor: float = 0.0,
    lambdas: Lambdas = PAPER_LAMBDAS,
    adv: str = "gan",
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_{G_i} = L_adv + λ_e L_e^fake + λ_l L_l^fake + λ_rec L_rec
    [+ λ_A L_A + λ_TV L_TV, with GANimation's attention masks].

    fake_src, fake_va_pred, fake_lm_pred = D_i(G_i(x, c_l, c_e)); c_l the
    target landmarks (B, 136); x_rec = G_i(G_i(x, c_l, c_e), c'_l, c'_e).
    ``masks``: the attention masks A of both passes (forward and cycle), as
    GANimation regularises both; L_A (`mask_sparsity`, with ``mask_budget``
    and ``mask_floor``) and L_TV are their means.
    """
    terms = {
        "e_fake": (lambdas.lambda_e, emotion_loss(fake_va_pred, c_e)),
        "l_fake": (lambdas.lambda_l, landmark_loss(fake_lm_pred, c_l)),
        "rec": (lambdas.lambda_rec, reconstruction_loss(x_rec, x)),
    }
    if masks:
        terms["mask"] = (
            lambdas.lambda_mask,
            torch.stack([mask_sparsity(A, budget=mask_budget, floor=mask_floor) for A in masks]).mean(),
        )
        terms["tv"] = (lambdas.lambda_tv, torch.stack([mask_tv(A) for A in masks]).mean())
    return _objective(g_adversarial(fake_src, adv=adv), **terms)
