"""Training of avLandmarkGAN's two converters and of the VA judge (the solver).

Three stages, each a loop of `steps` iterations that can stop anywhere and
resume exactly:

1. ``landmark`` -- G_l / D_l on normalised landmarks (Eqs. 1-5).
2. ``image``    -- G_i / D_i on aligned face crops; the target landmarks are
   G_l(x_l, c_e) from the frozen stage-1 generator, drawn on a white image at
   the face's own position and scale; the cycle goes back with the face's own
   landmarks c'_l and VA c'_e (Eqs. 6-10).
3. ``judge``    -- the independent ResNet-18 VA regressor used only to
   evaluate (trained on the same training split, class-balanced sampling).

Per-step randomness (batch, flips, target VA) comes from
``numpy.random.default_rng((seed, stage, step))``, so a run resumed from a
checkpoint draws exactly what an uninterrupted run would have drawn; torch's
own CPU kernels are deterministic here. A checkpoint -- model and optimiser
states, step, config, loss history -- is written to the object store every
`ckpt_every` steps and at the end of each stage, under
``synth/runs/<run>/<stage>.ckpt`` (published atomically by the store), and
read back with ``torch.load(weights_only=True)``.

Optimiser as StarGAN: Adam(lr 1e-4, betas 0.5/0.999), lr decaying linearly to
0 over the last half of the steps; batch 16 (paper).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from services.synth import colour as C
from services.synth import data as D
from services.synth import landmarks as L
from services.synth import losses as LS
from services.synth.model import (
    ImageDiscriminator,
    ImageGenerator,
    LandmarkDiscriminator,
    LandmarkGenerator,
    VAJudge,
)

log = logging.getLogger(__name__)

STAGES = ("landmark", "image", "judge")


@dataclasses.dataclass
class Config:
    size: int = 64
    conv_dim: int = 32  # G_i / D_i width
    g_repeat: int = 3  # residual blocks of G_i
    d_repeat: int = 5  # stride-2 convs of D_i (size / 2**d_repeat >= 1)
    d_max_dim: int = 0  # widest conv of D_i (0: no cap, StarGAN's doubling)
    channels: int = 3  # G_i/D_i image channels: 3 RGB, 1 luminance (colour.py)
    attention: bool = False  # G_i with GANimation's attention mask
    lm_hidden: int = 256
    lm_layers: int = 3
    judge_base: int = 32  # ResNet-18 widths base x (1, 2, 4, 8)
    judge_size: int = 0  # side the judge sees (crops are resized to it); 0: `size`
    batch: int = 16
    judge_batch: int = 64
    lr: float = 1e-4
    judge_lr: float = 1e-3
    beta1: float = 0.5
    beta2: float = 0.999
    decay_from: float = 0.5  # lr decays linearly to 0 from this fraction of the steps
    steps_landmark: int = 4000
    steps_image: int = 3000
    steps_judge: int = 2000
    # the λ of losses.Lambdas (default: the paper's); each converter has its own λ_e
    lambda_e: float = LS.PAPER_LAMBDAS.lambda_e  # landmark converter
    lambda_rec: float = LS.PAPER_LAMBDAS.lambda_rec
    lambda_ffc: float = LS.PAPER_LAMBDAS.lambda_ffc
    lambda_l: float = LS.PAPER_LAMBDAS.lambda_l
    lambda_e_image: float = LS.PAPER_LAMBDAS.lambda_e  # image converter
    lambda_mask: float = LS.PAPER_LAMBDAS.lambda_mask  # attention mask sparsity (GANimation)
    lambda_tv: float = LS.PAPER_LAMBDAS.lambda_tv  # attention mask smoothness (GANimation)
    mask_budget: float = 0.0  # most of each crop redrawn for free (losses.mask_sparsity)
    mask_floor: float = 0.0  # least of each crop redrawn for free
    # an exported model whose landmark converter and judge this run reuses
    # (their stages are then not trained; export copies them)
    base_model: str = ""
    # where the image stage starts: "RUN@STEP", that run's snapshot (G_i and
    # D_i), or an exported model file (its G_i; D_i fresh); a generator
    # without a mask gains one (`init_from_snapshot`)
    init_from: str = ""
    # the blend weight of a generator without a learned mask (paste.blend_weight):
    # "face" (the whole face hull) or "regions" (the expression regions)
    paste_mask: str = "face"
    # what is pasted (generate.Synthesizer.generate): "generated", the luma of
    # the generator's C; "residual", the input's luma plus C(target) - C(own),
    # the change the target makes to the generator's own rendering of the face
    paste_colour: str = "generated"
    adv: str = "gan"
    target_jitter: float = 0.05
    seed: int = 0
    ckpt_every: int = 250
    snapshot_every: int = 1000  # keep the nets (not the optimisers) at these steps, for ablations
    log_every: int = 50

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def steps(self, stage: str) -> int:
        return {"landmark": self.steps_landmark, "image": self.steps_image, "judge": self.steps_judge}[stage]

    def lambdas(self, stage: str) -> LS.Lambdas:
        """The loss weights of the "landmark" or "image" converter (λ_gp: the paper's)."""
        return LS.Lambdas(
            lambda_e=self.lambda_e_image if stage == "image" else self.lambda_e,
            lambda_rec=self.lambda_rec,
            lambda_ffc=self.lambda_ffc,
            lambda_l=self.lambda_l,
            lambda_mask=self.lambda_mask,
            lambda_tv=self.lambda_tv,
        )

    @property
    def judged_size(self) -> int:
        """Side of the crops the judge takes."""
        return self.judge_size or self.size


# -- networks -------------------------------------------------------------------------
def build(stage: str, cfg: Config) -> dict[str, torch.nn.Module]:
    if stage == "landmark":
        return {
            "G": LandmarkGenerator(cfg.lm_hidden, cfg.lm_layers),
            "D": LandmarkDiscriminator(cfg.lm_hidden),
        }
    if stage == "image":
        return {
            "G": ImageGenerator(cfg.size, cfg.conv_dim, cfg.g_repeat, cfg.channels, cfg.attention),
            "D": ImageDiscriminator(cfg.size, cfg.conv_dim, cfg.d_repeat, cfg.channels, cfg.d_max_dim),
        }
    if stage == "judge":
        return {"J": VAJudge(cfg.judge_base)}
    raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")


def optimisers(stage: str, nets: dict, cfg: Config) -> dict[str, torch.optim.Optimizer]:
    lr = cfg.judge_lr if stage == "judge" else cfg.lr
    betas = (0.9, 0.999) if stage == "judge" else (cfg.beta1, cfg.beta2)
    return {k: torch.optim.Adam(m.parameters(), lr=lr, betas=betas) for k, m in nets.items()}


def lr_at(step: int, total: int, base: float, decay_from: float) -> float:
    """Constant, then linear decay to 0 over the last (1 - decay_from) of the steps."""
    start = int(total * decay_from)
    if step < start or total <= start:
        return base
    return base * max(0.0, (total - step) / (total - start))


# -- checkpoints ----------------------------------------------------------------------
def ckpt_key(run: str, stage: str) -> str:
    return f"synth/runs/{run}/{stage}.ckpt"


def save_checkpoint(
    store, run: str, stage: str, step: int, cfg: Config, nets: dict, opts: dict, history: list[dict]
) -> None:
    state = {
        "stage": stage,
        "step": step,
        "config": cfg.to_dict(),
        "history": history,
        "nets": {k: m.state_dict() for k, m in nets.items()},
        "opts": {k: o.state_dict() for k, o in opts.items()},
    }
    bio = io.BytesIO()
    torch.save(state, bio)
    store.put_bytes(ckpt_key(run, stage), bio.getvalue())


def snapshot_key(run: str, stage: str, step: int) -> str:
    return f"synth/runs/{run}/{stage}@{step}.pt"


def save_snapshot(store, run: str, stage: str, step: int, nets: dict) -> None:
    bio = io.BytesIO()
    torch.save({"stage": stage, "step": step, "nets": {k: m.state_dict() for k, m in nets.items()}}, bio)
    store.put_bytes(snapshot_key(run, stage, step), bio.getvalue())


def load_snapshot(store, run: str, stage: str, step: int) -> dict:
    return torch.load(
        io.BytesIO(store.get_bytes(snapshot_key(run, stage, step))), weights_only=True, map_location="cpu"
    )


def load_checkpoint(store, run: str, stage: str) -> dict | None:
    key = ckpt_key(run, stage)
    if not store.exists(key):
        return None
    return torch.load(io.BytesIO(store.get_bytes(key)), weights_only=True, map_location="cpu")


# -- one step per stage ---------------------------------------------------------------------
def _flip_some(rng, pts: np.ndarray, images: np.ndarray | None, size: int):
    flip = rng.random(len(pts)) < 0.5
    pts = pts.copy()
    for i in np.flatnonzero(flip):
        pts[i] = L.flip_points(pts[i], size)
    if images is not None:
        images = images.copy()
        images[flip] = images[flip][:, :, ::-1]
    return pts, images


def _update(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One optimiser step down `loss`'s gradient."""
    opt.zero_grad()
    loss.backward()
    opt.step()


def _gan_row(
    d_loss: torch.Tensor, d_terms: dict[str, float], g_loss: torch.Tensor, g_terms: dict[str, float]
) -> dict[str, float]:
    """A GAN step's log row: the D and G totals, and their terms as D/<term>, G/<term>."""
    return {
        "D": d_loss.item(),
        "G": g_loss.item(),
        **{f"D/{k}": v for k, v in d_terms.items()},
        **{f"G/{k}": v for k, v in g_terms.items()},
    }


def landmark_step(nets, opts, fs: D.FaceSet, rng, cfg: Config) -> dict[str, float]:
    G, Dl = nets["G"], nets["D"]
    lambdas = cfg.lambdas("landmark")
    idx = D.batch_indices(rng, len(fs.va), cfg.batch)
    pts, _ = _flip_some(rng, fs.landmarks[idx], None, fs.size)
    x = torch.from_numpy(D.normalised_landmarks(pts)[0])
    c_real = torch.from_numpy(fs.va[idx])
    c_e = torch.from_numpy(D.class_balanced_targets(rng, len(idx), cfg.target_jitter))

    fake = G(x, c_e)
    real_src, real_va = Dl(x)
    fake_src, _ = Dl(fake.detach())
    d_loss, d_terms = LS.landmark_d_objective(
        real_src, fake_src, real_va, c_real, lambdas=lambdas, adv=cfg.adv, gp=_gp(Dl, x, fake, cfg)
    )
    _update(opts["D"], d_loss)

    fake_src, fake_va = Dl(fake)
    rec = G(fake, c_real)
    g_loss, g_terms = LS.landmark_g_objective(
        fake_src, fake_va, c_e, rec, x, fake, lambdas=lambdas, adv=cfg.adv
    )
    _update(opts["G"], g_loss)
    return _gan_row(d_loss, d_terms, g_loss, g_terms)


def _gp(Dnet, real, fake, cfg: Config):
    if cfg.adv != "wgan-gp":
        return None
    x_hat = LS.interpolate(real, fake.detach())
    return LS.gradient_penalty(Dnet(x_hat)[0], x_hat)


def image_step(nets, opts, fs: D.FaceSet, rng, cfg: Config, G_l: LandmarkGenerator) -> dict[str, float]:
    G, Di = nets["G"], nets["D"]
    lambdas = cfg.lambdas("image")
    idx = D.batch_indices(rng, len(fs.va), cfg.batch)
    pts, imgs = _flip_some(rng, fs.landmarks[idx], fs.images[idx], fs.size)
    lm, centres, radii = D.normalised_landmarks(pts)
    x = C.to_model(imgs, cfg.channels)
    x_l = torch.from_numpy(lm)
    c_real = torch.from_numpy(fs.va[idx])
    c_e = torch.from_numpy(D.class_balanced_targets(rng, len(idx), cfg.target_jitter))
    with torch.no_grad():
        c_l = G_l(x_l, c_e)
    lm_target = D.draw_batch(c_l.numpy(), fs.size, centres, radii)
    lm_own = D.draw_batch(lm, fs.size, centres, radii)

    fake, _, A = G.parts(x, lm_target, c_e)
    real_src, real_va, real_lm = Di(x)
    fake_src = Di(fake.detach())[0]
    d_loss, d_terms = LS.image_d_objective(
        real_src,
        fake_src,
        real_va,
        c_real,
        real_lm,
        x_l,
        lambdas=lambdas,
        adv=cfg.adv,
        gp=_gp(Di, x, fake, cfg),
    )
    _update(opts["D"], d_loss)

    fake_src, fake_va, fake_lm = Di(fake)
    rec, _, A_rec = G.parts(fake, lm_own, c_real)
    masks = () if A is None or A_rec is None else (A, A_rec)
    g_loss, g_terms = LS.image_g_objective(
        fake_src,
        fake_va,
        c_e,
        fake_lm,
        c_l,
        rec,
        x,
        masks=masks,
        mask_budget=cfg.mask_budget,
        mask_floor=cfg.mask_floor,
        lambdas=lambdas,
        adv=cfg.adv,
    )
    _update(opts["G"], g_loss)
    return _gan_row(d_loss, d_terms, g_loss, g_terms)


def judge_augment(rng, imgs: np.ndarray) -> np.ndarray:
    """Flip half, shift by up to 1/16 of the side (replicated border), jitter
    brightness/contrast by +-15 %: the judge must not key on the exact crop."""
    n, s = len(imgs), imgs.shape[1]
    out = imgs.astype(np.float32)
    flip = rng.random(n) < 0.5
    out[flip] = out[flip][:, :, ::-1]
    m = max(1, s // 16)
    pad = np.pad(out, ((0, 0), (m, m), (m, m), (0, 0)), mode="edge")
    dx, dy = rng.integers(0, 2 * m + 1, n), rng.integers(0, 2 * m + 1, n)
    out = np.stack([pad[i, dy[i] : dy[i] + s, dx[i] : dx[i] + s] for i in range(n)])
    a = rng.uniform(0.85, 1.15, (n, 1, 1, 1)).astype(np.float32)
    b = rng.uniform(-20, 20, (n, 1, 1, 1)).astype(np.float32)
    return np.clip(out * a + b, 0, 255).astype(np.uint8)


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Sampling probabilities ~ 1/sqrt(class count): rare classes (9 contempt
    faces) are seen often enough without the judge memorising them."""
    lab = np.where(labels < 0, 0, labels)
    counts = np.bincount(lab, minlength=lab.max() + 1).astype(np.float64)
    w = 1.0 / np.sqrt(counts[lab])
    return w / w.sum()


def judge_step(nets, opts, fs: D.FaceSet, rng, cfg: Config, weights: np.ndarray) -> dict[str, float]:
    J = nets["J"]
    idx = rng.choice(len(fs.va), cfg.judge_batch, p=weights)
    x = D.to_tensor_images(judge_augment(rng, fs.images[idx]))
    loss = F.mse_loss(J(x), torch.from_numpy(fs.va[idx]))
    _update(opts["J"], loss)
    return {"J": loss.item()}


@torch.no_grad()
def judge_va(J: VAJudge, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 2) judged VA."""
    J.eval()
    out = [J(D.to_tensor_images(images[i : i + batch])).numpy() for i in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


# -- the loop -----------------------------------------------------------------------------
def train_stage(
    stage: str,
    fs: D.FaceSet,
    store,
    run: str,
    cfg: Config,
    G_l: LandmarkGenerator | None = None,
    stop_after: int | None = None,
    progress: Callable[[str, int, int, dict], None] | None = None,
) -> dict:
    """Train (or resume, or skip if finished) one stage; returns the checkpoint dict.

    `stop_after`: stop once this global step is reached (tests, interruption drills)."""
    torch.manual_seed(cfg.seed)
    nets = build(stage, cfg)
    opts = optimisers(stage, nets, cfg)
    total = cfg.steps(stage)
    step, history = 0, []
    ck = load_checkpoint(store, run, stage)
    if ck is not None:
        if Config.from_dict(ck["config"]).steps(stage) != total:
            log.warning("checkpoint for a different step count: continuing to the new total")
        for k, m in nets.items():
            m.load_state_dict(ck["nets"][k])
        for k, o in opts.items():
            o.load_state_dict(ck["opts"][k])
        step, history = int(ck["step"]), list(ck["history"])
    elif stage == "image" and cfg.init_from:
        init_from_snapshot(nets, initial_nets(store, cfg.init_from))
    stage_id = STAGES.index(stage)
    weights = balanced_weights(fs.label) if stage == "judge" else None
    if stage == "image" and G_l is None:
        raise ValueError("the image stage needs the trained landmark generator G_l")
    for m in nets.values():
        m.train()
    end = total if stop_after is None else min(total, stop_after)
    acc: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    while step < end:
        rng = np.random.default_rng((cfg.seed, stage_id, step))
        base = cfg.judge_lr if stage == "judge" else cfg.lr
        for o in opts.values():
            for g in o.param_groups:
                g["lr"] = lr_at(step, total, base, cfg.decay_from)
        if stage == "landmark":
            terms = landmark_step(nets, opts, fs, rng, cfg)
        elif stage == "image":
            assert G_l is not None  # checked before the loop
            terms = image_step(nets, opts, fs, rng, cfg, G_l)
        else:
            assert weights is not None  # the judge stage: set before the loop
            terms = judge_step(nets, opts, fs, rng, cfg, weights)
        step += 1
        for k, v in terms.items():
            acc.setdefault(k, []).append(v)
        if step % cfg.log_every == 0 or step == end:
            row = {"step": step, "s_per_step": (time.perf_counter() - t0) / max(1, len(acc[next(iter(acc))]))}
            row.update({k: float(np.mean(v)) for k, v in acc.items()})
            history.append(row)
            acc.clear()
            t0 = time.perf_counter()
            if progress:
                progress(stage, step, total, row)
        if step % cfg.ckpt_every == 0 or step == end:
            save_checkpoint(store, run, stage, step, cfg, nets, opts, history)
        if cfg.snapshot_every and step % cfg.snapshot_every == 0:
            save_snapshot(store, run, stage, step, nets)
    if step:
        ck = load_checkpoint(store, run, stage)
        assert ck is not None  # saved at step `end` in the loop, or loaded before it
        return ck
    return {"nets": {k: m.state_dict() for k, m in nets.items()}, "step": 0, "history": history}


def initial_nets(store, source: str) -> dict:
    """`Config.init_from` -> {"nets": {name: state dict}}: a snapshot
    "RUN@STEP", or an exported model file (its G_i only)."""
    if "@" in source and not source.endswith(".pt"):
        run_from, step_from = source.rsplit("@", 1)
        return load_snapshot(store, run_from, "image", int(step_from))
    blob = torch.load(source, weights_only=True, map_location="cpu")
    return {"nets": {"G": blob["G_i"]}}


def init_from_snapshot(nets: dict[str, torch.nn.Module], snapshot: dict) -> None:
    """Load a snapshot's G_i and D_i (those it has) into `nets`. A plain generator's weights
    go into an attention generator too: its last conv gains the mask's output
    channel, initialised like every other weight (N(0, 0.02), so A starts
    near 0.5): the colour C starts as the plain generator's output, which is
    what lets the mask learn where C is needed (a freshly initialised C costs
    so much reconstruction wherever it is used that the mask closes for
    good; see losses.mask_sparsity)."""
    for k, m in nets.items():
        if k not in snapshot["nets"]:
            continue
        state = dict(snapshot["nets"][k])
        own = m.state_dict()
        for name, t in own.items():
            if name in state and state[name].shape != t.shape and t.shape[1:] == state[name].shape[1:]:
                grown = torch.empty_like(t).normal_(0.0, 0.02)
                grown[: state[name].shape[0]] = state[name]
                state[name] = grown
        m.load_state_dict(state)


def nets_from_checkpoint(stage: str, ck: dict, cfg: Config) -> dict[str, torch.nn.Module]:
    nets = build(stage, cfg)
    for k, m in nets.items():
        m.load_state_dict(ck["nets"][k])
        m.eval()
    return nets
