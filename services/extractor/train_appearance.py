"""Train the appearance channel (`dyadlab/face/appearance.py`) on the labelled
expression images, evaluate it, export TorchScript.

    .venv/bin/python -m services.extractor.train_appearance \
        --data ../shared/data/expressions [--steps 6000] [--seed 0] \
        [--out dyadlab/face/assets/appearance-v1.pt]

Data. Every image of `images/` with a label in `legend_subset.csv`: smile =
"happiness"; not a smile = every other label (neutral, surprise, sadness,
anger, disgust, fear, contempt — surprise's open mouth teaches that an open
mouth is no smile). The face is found with the project's own front-end
(`still.find_mesh`: BlazeFace + mesh, 68 points via `ibug68`) and cut with
`align.crop` (the same crop the extractor cuts from video), at 96x96 with a
margin for augmentation; crops are cached in `.cache/appearance/`.
Validation split: fixed, by person (the file name without its trailing
`_NNNN` number; one person's photos never straddle the split), the persons
whose SHA-1 (as a number) is 0 mod 10 -> ~10 % of the images.

Augmentation (the video is not the photos): pose (rotation +-20 deg, scale
+-12 %, shift +-6 %, mirror, a horizontal squeeze of up to 30 % from one
side as a stand-in for yaw), low resolution (down to 16 px, then back up:
infants' faces in home video are small), blur, noise, brightness, contrast
and gamma; and synthetic occluders on half of the occlusion batch: a
"hand" (palm ellipse and four finger capsules filled with skin texture from
another face) or an "object" (a textured ellipse or rectangle), covering
most of the mouth (label occluded = 1, smile label unused) or placed away
from it (occluded = 0, smile label kept).

Loss: binary cross-entropy on the smile logit (where the mouth is visible)
+ binary cross-entropy on the occluded logit. AdamW, lr 2e-3 with cosine
decay, batch 64. Checkpoints every 500 steps; an interrupted run resumes.
Reported: ROC AUC of P(smile) on the validation split (clean crops), also
at 24 px resolution, and occlusion AUC on validation crops with synthetic
occluders.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "appearance"
BIG = 96  # cached crop size
MARGIN = 0.25  # BIG crop = template square + 25 % each side
CROPS_VERSION = "v3"  # v3: least-squares similarity alignment (align.similarity)
OUT = 64
# Mouth box in the 64x64 crop (template mouth centre at (0.5, 0.76)).
MOUTH = (0.30 * OUT, 0.64 * OUT, 0.70 * OUT, 0.90 * OUT)


# -- data --------------------------------------------------------------------------
def person(name: str) -> str:
    stem = Path(name).stem
    return re.sub(r"_\d{4}$", "", stem)


def is_validation(name: str) -> bool:
    return int(hashlib.sha1(person(name).encode()).hexdigest(), 16) % 10 == 0


def labels(data: Path) -> dict[str, str]:
    """image -> its (lower-cased) label; images with conflicting labels take
    the alphabetically first that is not happiness, or are dropped when
    labelled both happy and not."""
    out: dict[str, set] = {}
    with open(data / "legend_subset.csv", newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["image"], set()).add(row["emotion"].strip().lower())
    return {
        k: ("happiness" if v == {"happiness"} else sorted(v)[0])
        for k, v in out.items()
        if v == {"happiness"} or "happiness" not in v
    }


def build_crops(data: Path) -> dict[str, np.ndarray]:
    """Aligned 96x96 crops of every labelled image (cached)."""
    from dyadlab.face import align, ibug68
    from dyadlab.face.still import find_mesh

    CACHE.mkdir(parents=True, exist_ok=True)
    cache = CACHE / f"crops-{CROPS_VERSION}.npz"
    if cache.exists():
        z = np.load(cache)
        return {k: z[k] for k in z.files}
    lab = labels(data)
    names, crops, emotion, val, presence = [], [], [], [], []
    missing = 0
    t0 = time.time()
    for i, name in enumerate(sorted(lab)):
        img = cv2.imread(str(data / "images" / name), cv2.IMREAD_COLOR)
        if img is None:
            missing += 1
            continue
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        m = find_mesh(img)
        if m is None:
            missing += 1
            continue
        c = align.crop(img, ibug68.to68(m.points), BIG, MARGIN)
        if c is None:
            missing += 1
            continue
        names.append(name)
        crops.append(c)
        emotion.append(lab[name])
        val.append(is_validation(name))
        presence.append(m.presence)
        if i % 1000 == 0:
            print(f"  crops: {i}/{len(lab)} images ({time.time() - t0:.0f} s)", flush=True)
    out = {
        "names": np.array(names),
        "crops": np.stack(crops),
        "emotion": np.array(emotion),
        "smile": (np.array(emotion) == "happiness").astype(np.int64),
        "val": np.array(val),
        "presence": np.array(presence, np.float32),
        "missing": np.array([missing]),
    }
    np.savez_compressed(cache, **out)
    return out


# -- augmentation ------------------------------------------------------------------------
def _skin_patch(rng, crops: np.ndarray, size: int) -> np.ndarray:
    """Skin texture: a cheek/forehead patch of a random other face, resized."""
    c = crops[rng.integers(len(crops))]
    y0 = int(rng.choice([10, 52]))  # forehead or cheek band of the 96 crop
    x0 = int(rng.integers(20, 56))
    p = c[y0 : y0 + 20, x0 : x0 + 20].astype(np.float32)
    p = cv2.resize(p, (size, size), interpolation=cv2.INTER_LINEAR)
    return p * rng.uniform(0.8, 1.25) + rng.uniform(-20, 20)


def _occluder(rng, crops: np.ndarray, over_mouth: bool) -> tuple[np.ndarray, np.ndarray]:
    """(alpha mask, texture) on the OUT x OUT crop."""
    mask: np.ndarray = np.zeros((OUT, OUT), np.float32)
    mx0, my0, mx1, my1 = MOUTH
    if over_mouth:
        cx = rng.uniform(mx0 + 4, mx1 - 4)
        cy = rng.uniform(my0 + 2, my1 - 2)
    else:  # away from the mouth: eyes, forehead, a cheek, the chin edge
        cx, cy = [(rng.uniform(8, 56), rng.uniform(4, 30)), (rng.choice([6.0, 58.0]), rng.uniform(20, 50))][
            int(rng.integers(2))
        ]
    ang = rng.uniform(0, 180)
    if rng.random() < 0.6:  # a hand: palm and fingers
        r = rng.uniform(9, 15)
        cv2.ellipse(mask, (int(cx), int(cy)), (int(r), int(r * 0.8)), ang, 0, 360, 1.0, -1)
        for k in range(4):
            a = np.radians(ang + rng.uniform(-35, 35) + (k - 1.5) * 14)
            L = rng.uniform(12, 22)
            p0 = (int(cx), int(cy))
            p1 = (int(cx + L * np.cos(a)), int(cy + L * np.sin(a)))
            cv2.line(mask, p0, p1, 1.0, int(rng.uniform(3, 6)))
        tex = _skin_patch(rng, crops, OUT)
    else:  # an object: cloth, a toy, a cup
        ax, ay = rng.uniform(8, 20), rng.uniform(6, 16)
        if rng.random() < 0.5:
            cv2.ellipse(mask, (int(cx), int(cy)), (int(ax), int(ay)), ang, 0, 360, 1.0, -1)
        else:
            box = cv2.boxPoints(((cx, cy), (2 * ax, 2 * ay), ang)).astype(np.int32)
            cv2.fillPoly(mask, [box], 1.0)
        tex = np.full((OUT, OUT), rng.uniform(20, 235), np.float32)
        tex += cv2.GaussianBlur(rng.normal(0, rng.uniform(3, 25), (OUT, OUT)).astype(np.float32), (0, 0), 1.5)
    mask = cv2.GaussianBlur(mask, (0, 0), rng.uniform(0.5, 1.5))
    return mask, tex


def mouth_covered(mask: np.ndarray) -> float:
    x0, y0, x1, y1 = (int(round(v)) for v in MOUTH)
    return float(mask[y0:y1, x0:x1].mean())


def augment(
    rng, big: np.ndarray, crops: np.ndarray, occlude: bool = True, strength: float = 1.0
) -> tuple[np.ndarray, int]:
    """One 64x64 training crop from a 96x96 cached crop; returns (crop, occluded)."""
    s = strength
    c = BIG / 2
    ang = rng.uniform(-20, 20) * s
    scale = OUT / (BIG / (1 + 2 * MARGIN)) * (1 + rng.uniform(-0.12, 0.12) * s)
    M: np.ndarray = cv2.getRotationMatrix2D((c, c), ang, scale)
    M[:, 2] += (OUT / 2 - c) + rng.uniform(-0.06, 0.06, 2) * OUT * s
    img = cv2.warpAffine(big, M, (OUT, OUT), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if rng.random() < 0.4 * s:  # yaw stand-in: squeeze one side
        k = rng.uniform(0.7, 1.0)
        src = np.array([[0, 0], [OUT, 0], [0, OUT], [OUT, OUT]], np.float32)
        dst = src.copy()
        side = 1 if rng.random() < 0.5 else 0
        dst[[side, side + 2], 0] = OUT / 2 + (dst[[side, side + 2], 0] - OUT / 2) * k
        P = cv2.getPerspectiveTransform(src, dst)
        img = cv2.warpPerspective(np.ascontiguousarray(img), P, (OUT, OUT), borderMode=cv2.BORDER_REPLICATE)
    img = np.ascontiguousarray(img).astype(np.float32)
    occluded = 0
    if occlude and rng.random() < 0.35:
        over = rng.random() < 0.65
        mask, tex = _occluder(rng, crops, over)
        img = img * (1 - mask) + tex * mask
        occluded = int(mouth_covered(mask) >= 0.45)
    if rng.random() < 0.5 * s:  # low resolution
        r = int(rng.uniform(16, 48))
        img = cv2.resize(
            cv2.resize(img, (r, r), interpolation=cv2.INTER_AREA), (OUT, OUT), interpolation=cv2.INTER_LINEAR
        )
    if rng.random() < 0.3 * s:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.5))
    g = rng.uniform(0.6, 1.6) if rng.random() < 0.5 * s else 1.0
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** g
    img = (img - 128) * rng.uniform(0.6, 1.3) ** s + 128 + rng.uniform(-35, 35) * s
    img = img + rng.normal(0, rng.uniform(0, 6) * s, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), occluded


def center(big: np.ndarray) -> np.ndarray:
    """The un-augmented 64x64 crop (what `align.crop(..., 64)` cuts)."""
    k = OUT / (BIG / (1 + 2 * MARGIN))
    c = BIG / 2
    M: np.ndarray = cv2.getRotationMatrix2D((c, c), 0, k)
    M[:, 2] += OUT / 2 - c
    return cv2.warpAffine(big, M, (OUT, OUT), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)


# -- training -----------------------------------------------------------------------------
def auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def evaluate(net, d: dict, rng_seed: int = 123) -> dict:
    import torch

    rng = np.random.default_rng(rng_seed)
    v = np.flatnonzero(d["val"])
    clean = np.stack([center(d["crops"][i]) for i in v])
    low = np.stack(
        [cv2.resize(cv2.resize(c, (24, 24), interpolation=cv2.INTER_AREA), (OUT, OUT)) for c in clean]
    )
    occ, occ_y = [], []
    for i in v:
        img = center(d["crops"][i]).astype(np.float32)
        mask, tex = _occluder(rng, d["crops"], rng.random() < 0.5)
        occ.append(np.clip(img * (1 - mask) + tex * mask, 0, 255).astype(np.uint8))
        occ_y.append(int(mouth_covered(mask) >= 0.45))
    net.eval()
    with torch.inference_mode():

        def run(x):
            t = torch.from_numpy(x.astype(np.float32) / 255.0)[:, None]
            return torch.sigmoid(net(t)).numpy()

        p_clean, p_low, p_occ = run(clean), run(low), run(np.stack(occ))
    y = d["smile"][v]
    net.train()
    return {
        "n_val": int(len(v)),
        "n_val_smile": int(y.sum()),
        "auc_smile": auc(y, p_clean[:, 0]),
        "auc_smile_24px": auc(y, p_low[:, 0]),
        "auc_occluded": auc(np.array(occ_y), p_occ[:, 1]),
        "false_occluded_clean": float((p_clean[:, 1] > 0.5).mean()),
    }


def train(
    d: dict, steps: int, seed: int, ckpt: Path, batch: int = 64, width: int = 16, hard_share: float = 0.25
) -> object:
    import torch
    import torch.nn.functional as F

    from dyadlab.face.appearance import build

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build(width)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    start = 0
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=True)
        net.load_state_dict(st["net"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        rng.bit_generator.state = st["rng"]
        torch.set_rng_state(st["torch_rng"])
        start = st["step"]
        print(f"resuming at step {start}")
    tr = np.flatnonzero(~d["val"])
    crops, smile = d["crops"], d["smile"]
    # Balance the classes: each batch half smiles, half not; of the latter,
    # half neutral and half the other expressions (the hard negatives: a
    # grimace, a cry face or disgust pull the lips too, but are no smile).
    pos = tr[smile[tr] == 1]
    hard = tr[(smile[tr] == 0) & (d["emotion"][tr] != "neutral")]
    neutral = tr[(smile[tr] == 0) & (d["emotion"][tr] == "neutral")]
    t0 = time.time()
    net.train()
    for step in range(start, steps):
        n_hard = int(round(batch * hard_share))
        idx = np.concatenate(
            [rng.choice(pos, batch // 2), rng.choice(neutral, batch // 2 - n_hard), rng.choice(hard, n_hard)]
        )
        xs, occ = zip(*(augment(rng, crops[i], crops) for i in idx))
        x = torch.from_numpy(np.stack(xs).astype(np.float32) / 255.0)[:, None]
        y_s = torch.from_numpy(smile[idx].astype(np.float32))
        y_o = torch.tensor(occ, dtype=torch.float32)
        logits = net(x)
        visible = 1.0 - y_o
        loss_smile = (
            F.binary_cross_entropy_with_logits(logits[:, 0], y_s, reduction="none") * visible
        ).sum() / visible.sum().clamp_min(1.0)
        loss_occluded = F.binary_cross_entropy_with_logits(logits[:, 1], y_o)
        loss = loss_smile + loss_occluded
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            print(
                f"step {step + 1}/{steps} loss_smile {loss_smile.item():.3f} "
                f"loss_occluded {loss_occluded.item():.3f} ({time.time() - t0:.0f} s)",
                flush=True,
            )
        if (step + 1) % 500 == 0 or step + 1 == steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save(
                {
                    "net": net.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(),
                    "step": step + 1,
                },
                tmp,
            )
            tmp.replace(ckpt)
    return net


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "expressions"))
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "dyadlab" / "face" / "assets" / "appearance-v1.pt"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--width", type=int, default=16, help="channels of the first convolution")
    ap.add_argument(
        "--hard-share",
        type=float,
        default=0.25,
        help="share of each batch drawn from the non-neutral, non-happy images",
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    d = build_crops(Path(a.data))
    print(
        f"{len(d['crops'])} faces ({int(d['missing'][0])} images without a usable face), "
        f"{int(d['smile'].sum())} smiling; validation {int(d['val'].sum())} "
        f"({time.time() - t0:.0f} s)"
    )
    ckpt = CACHE / (f"train-{CROPS_VERSION}-seed{a.seed}-steps{a.steps}-w{a.width}-h{a.hard_share:g}.ckpt")
    net = train(d, a.steps, a.seed, ckpt, width=a.width, hard_share=a.hard_share)
    metrics = export(net, d, Path(a.out))
    metrics.update(
        steps=a.steps,
        seed=a.seed,
        width=a.width,
        hard_share=a.hard_share,
        train_seconds=round(time.time() - t0),
        n_train=int((~d["val"]).sum()),
        n_faces=int(len(d["crops"])),
    )
    Path(a.out).with_suffix(".json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps(metrics, indent=1))
    print("wrote", a.out)


def calibrate(net, d: dict) -> tuple[float, float, float]:
    """Smile logits of the validation faces: the neutral median, the neutral
    90th percentile and the happy median (the points the AU scale is pinned to)."""
    import torch

    v = np.flatnonzero(d["val"])
    clean = np.stack([center(d["crops"][i]) for i in v])
    net.eval()
    with torch.inference_mode():
        z = net(torch.from_numpy(clean.astype(np.float32) / 255.0)[:, None])[:, 0].numpy()
    emo = d["emotion"][v]
    neutral = z[emo == "neutral"]
    return (
        float(np.median(neutral)),
        float(np.percentile(neutral, 90)),
        float(np.median(z[emo == "happiness"])),
    )


def export(net, d: dict, out: Path) -> dict:
    """Evaluate, store the calibration inside the model, save TorchScript."""
    import torch

    metrics = evaluate(net, d)
    mid, lo, hi = calibrate(net, d)
    net.calibration = torch.tensor([mid, lo, hi])
    metrics.update(
        logit_neutral_median=round(mid, 4), logit_neutral_p90=round(lo, 4), logit_happy_median=round(hi, 4)
    )
    net.eval()
    torch.jit.script(net).save(str(out))
    return metrics


if __name__ == "__main__":
    main()


def held_out(data: Path, limit: int = 0) -> dict[str, np.ndarray]:
    """The validation split's 64x64 crops (what the extractor would cut), its
    labels and the 68 points (for tests and model-card numbers; no cache)."""
    from dyadlab.face import align, ibug68
    from dyadlab.face.still import find_mesh

    lab = labels(data)
    names = [n for n in sorted(lab) if is_validation(n)]
    if limit:
        names = names[:limit]
    crops, emo, pts, kept = [], [], [], []
    for name in names:
        img = cv2.imread(str(data / "images" / name), cv2.IMREAD_COLOR)
        if img is None:
            continue
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        m = find_mesh(img)
        if m is None:
            continue
        p3 = ibug68.to68(m.points)
        c = align.crop(img, p3[:, :2], OUT)
        if c is None:
            continue
        crops.append(c)
        emo.append(lab[name])
        pts.append(p3)
        kept.append(name)
    return {
        "names": np.array(kept),
        "crops": np.stack(crops),
        "emotion": np.array(emo),
        "points": np.stack(pts).astype(np.float32),
    }
