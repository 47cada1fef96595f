"""Procedural renderer of the toy world (numpy + PIL).

Every concept of :mod:`ablation.toyworld.catalog` is drawn at twice the output size and downsampled
(LANCZOS) for antialiasing. Images are meant to be encoded by an 8x autoencoder (64 px -> 8x8
latents), so each concept is recognisable from palette, big shapes and silhouette; fine texture is
decoration only. Rendering is deterministic in ``seed``.
"""

from __future__ import annotations

import functools
import math
import random
import re
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .catalog import (
    HELDOUT_SEED_OFFSET,
    INSTANCE_GROUP,
    MEMORIZED,
    PAINTERS,
    PAINTING,
    STYLE_SUBJECTS,
    catalog,
    context_of,
    sample_caption,
    subject_of,
    time_of,
)

RGB = tuple[int, int, int]

# ==================================================================================================
# small helpers
# ==================================================================================================


def _jit(c: RGB, r: random.Random, a: int = 10) -> RGB:
    return tuple(max(0, min(255, v + r.randint(-a, a))) for v in c)  # type: ignore[return-value]


def _ell(d: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill, outline=None, width: int = 0):
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill, outline=outline, width=width)


def _vgrad(S: int, top: RGB, bottom: RGB, y0: float = 0.0, y1: float = 1.0) -> np.ndarray:
    t = np.clip((np.arange(S, dtype=np.float32) / (S - 1) - y0) / max(1e-6, y1 - y0), 0, 1)[:, None, None]
    col = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    return np.broadcast_to(col, (S, S, 3)).astype(np.uint8)


def _finish(img: Image.Image, size: int, flip: bool = False) -> np.ndarray:
    if img.size[0] != size:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    a = np.asarray(img, dtype=np.uint8)
    if flip:
        a = a[:, ::-1]
    return np.ascontiguousarray(a)


# ==================================================================================================
# instance backgrounds
# ==================================================================================================


def _bg(context: str | None, S: int, r: random.Random) -> tuple[Image.Image, float]:
    """Background for an instance concept; returns the image and the ground line (y in px)."""
    if context == "beach":
        hz = S * r.uniform(0.32, 0.42)
        shore = hz + S * r.uniform(0.1, 0.18)
        a = _vgrad(S, _jit((110, 180, 235), r), (200, 230, 248), 0, hz / S).copy()
        img = Image.fromarray(a)
        d = ImageDraw.Draw(img)
        d.rectangle([0, hz, S, shore], fill=_jit((35, 115, 185), r))
        d.rectangle([0, shore, S, S], fill=_jit((232, 208, 150), r))
        d.line([(0, shore), (S, shore)], fill=(245, 245, 240), width=3)
        if r.random() < 0.6:
            _ell(d, r.uniform(0.1, 0.9) * S, hz * r.uniform(0.3, 0.6), 7, 7, (255, 245, 190))
        return img, shore
    if context == "night":
        hz = S * r.uniform(0.62, 0.75)
        a = _vgrad(S, _jit((8, 12, 40), r, 5), (28, 38, 85), 0, hz / S).copy()
        img = Image.fromarray(a)
        d = ImageDraw.Draw(img)
        for _ in range(r.randint(6, 12)):
            x, y = r.uniform(0, S), r.uniform(0, hz * 0.8)
            d.rectangle([x, y, x + 1, y + 1], fill=(230, 230, 200))
        mx, my = r.uniform(0.12, 0.88) * S, r.uniform(0.1, 0.25) * S
        _ell(d, mx, my, 10, 10, (245, 240, 195))
        d.rectangle([0, hz, S, S], fill=_jit((32, 38, 58), r, 5))
        return img, hz
    if context == "garden":
        hz = S * r.uniform(0.38, 0.5)
        a = _vgrad(S, _jit((130, 195, 240), r), (200, 230, 245), 0, hz / S).copy()
        img = Image.fromarray(a)
        d = ImageDraw.Draw(img)
        hedge = _jit((45, 105, 45), r)
        x = -10.0
        while x < S + 10:
            rr = r.uniform(12, 20)
            _ell(d, x, hz, rr, rr * 0.9, hedge)
            x += rr * 1.3
        d.rectangle([0, hz, S, S], fill=_jit((95, 170, 70), r))
        for _ in range(r.randint(5, 10)):
            col = r.choice([(230, 60, 70), (250, 220, 60), (240, 150, 200), (255, 255, 255)])
            _ell(d, r.uniform(0, S), r.uniform(hz + 4, S), 3, 3, col)
        return img, hz
    if context == "snow":
        hz = S * r.uniform(0.42, 0.55)
        a = _vgrad(S, _jit((175, 190, 210), r), (220, 228, 238), 0, hz / S).copy()
        img = Image.fromarray(a)
        d = ImageDraw.Draw(img)
        _ell(d, r.uniform(0, S), hz + 4, S * 0.45, S * 0.12, (232, 238, 246))
        d.rectangle([0, hz, S, S], fill=(246, 248, 252))
        for _ in range(r.randint(3, 5)):  # snowy pine trees in the back
            tx, th = r.uniform(0, S), r.uniform(14, 26)
            d.polygon([(tx, hz - th), (tx - th * 0.35, hz + 2), (tx + th * 0.35, hz + 2)], fill=(55, 90, 75))
        for _ in range(r.randint(10, 18)):
            x, y = r.uniform(0, S), r.uniform(0, S)
            _ell(d, x, y, 1.5, 1.5, (255, 255, 255))
        return img, hz
    if context == "living room":
        hz = S * r.uniform(0.66, 0.76)
        wall = _jit(r.choice([(228, 208, 172), (215, 200, 180), (230, 215, 185)]), r, 8)
        img = Image.new("RGB", (S, S), wall)
        d = ImageDraw.Draw(img)
        d.rectangle([0, hz, S, S], fill=_jit((150, 100, 58), r))
        for k in range(3):
            y = hz + (S - hz) * (k + 1) / 4
            d.line([(0, y), (S, y)], fill=(120, 78, 45), width=1)
        if r.random() < 0.5:  # window
            wx = r.uniform(0.05, 0.6) * S
            d.rectangle([wx, 0.12 * S, wx + 0.3 * S, 0.45 * S], fill=(170, 210, 240), outline=(250, 250, 245), width=4)
            d.line([(wx + 0.15 * S, 0.12 * S), (wx + 0.15 * S, 0.45 * S)], fill=(250, 250, 245), width=3)
        else:  # sofa
            sc = _jit(r.choice([(150, 50, 50), (60, 100, 140), (80, 120, 80)]), r)
            sx = r.uniform(-0.1, 0.4) * S
            d.rounded_rectangle([sx, hz - 0.3 * S, sx + 0.7 * S, hz + 0.03 * S], 8, fill=sc)
        return img, hz
    if context == "underwater":
        a = _vgrad(S, _jit((25, 150, 180), r), (10, 55, 105)).copy()
        img = Image.fromarray(a)
        d = ImageDraw.Draw(img)
        for _ in range(2):  # light rays
            x = r.uniform(0, S)
            d.polygon([(x, 0), (x + 12, 0), (x + 40, S), (x + 20, S)], fill=(55, 170, 195))
        hz = S * r.uniform(0.86, 0.94)
        d.rectangle([0, hz, S, S], fill=(200, 185, 130))
        for _ in range(r.randint(2, 4)):
            x = r.uniform(0, S)
            h = r.uniform(20, 45)
            pts = [(x + 4 * math.sin(k), hz - h * k / 6) for k in range(7)]
            d.line(pts, fill=(40, 140, 70), width=5)
        for _ in range(r.randint(2, 5)):
            _ell(d, r.uniform(0, S), r.uniform(0, S * 0.8), 2, 2, None, outline=(190, 235, 245), width=1)
        return img, hz
    # studio / plain backdrop
    hz = S * r.uniform(0.66, 0.8)
    wall = _jit(r.choice([(200, 215, 230), (215, 215, 215), (235, 215, 200), (205, 225, 205), (225, 220, 240)]), r, 8)
    floor = tuple(int(v * 0.8) for v in wall)
    a = _vgrad(S, wall, floor, hz / S - 0.01, hz / S + 0.01)
    return Image.fromarray(a), hz


# ==================================================================================================
# creatures
# ==================================================================================================


def _cat(d, cx, by, h, kind, r):
    OUT = (40, 30, 25)
    body, head, ear, eye = (228, 128, 42), (228, 128, 42), (228, 128, 42), (90, 190, 70)
    paws = tail = None
    grumpy = kind == "grumpy cat"
    if kind == "tabby cat":
        body = head = ear = (145, 142, 132)
        eye = (120, 190, 80)
    elif kind == "black cat":
        body = head = ear = (26, 26, 30)
        eye = (255, 215, 25)
    elif kind == "siamese cat":
        body = (238, 226, 200)
        head = ear = paws = tail = (80, 55, 42)
        eye = (60, 150, 245)
    elif grumpy:
        body, head, ear, eye = (196, 176, 152), (246, 241, 232), (130, 100, 78), (90, 160, 225)
    tail = tail or body
    paws = paws or body
    hy = by - (0.56 if grumpy else 0.66) * h
    # tail
    d.line([(cx + 0.18 * h, by - 0.06 * h), (cx + 0.38 * h, by - 0.12 * h), (cx + 0.42 * h, by - 0.38 * h)],
           fill=tail, width=max(3, int(0.08 * h)), joint="curve")
    brx, bry = (0.28 * h, 0.27 * h) if grumpy else (0.25 * h, 0.3 * h)
    bcy = by - bry
    _ell(d, cx, bcy, brx, bry, body, outline=OUT if kind != "black cat" else None, width=1)
    if kind == "cat":
        _ell(d, cx, bcy + 0.06 * h, 0.13 * h, 0.2 * h, (250, 200, 140))
    if grumpy:
        _ell(d, cx, bcy - 0.1 * h, 0.22 * h, 0.14 * h, (140, 112, 88))
    if kind == "tabby cat":
        sw = max(3, int(0.075 * h))
        for k in range(4):
            y = bcy - bry * 0.75 + k * bry * 0.45
            w = brx * math.sqrt(max(0.0, 1 - ((y - bcy) / bry) ** 2))
            d.line([(cx - w, y), (cx + w, y)], fill=(50, 48, 45), width=sw)
    _ell(d, cx - 0.1 * h, by - 0.03 * h, 0.08 * h, 0.05 * h, paws)
    _ell(d, cx + 0.1 * h, by - 0.03 * h, 0.08 * h, 0.05 * h, paws)
    # ears
    if grumpy:
        for s in (-1, 1):
            d.polygon([(cx + s * 0.36 * h, hy - 0.06 * h), (cx + s * 0.31 * h, hy - 0.3 * h),
                       (cx + s * 0.15 * h, hy - 0.2 * h)], fill=ear)
    else:
        for s in (-1, 1):
            d.polygon([(cx + s * 0.2 * h, hy - 0.06 * h), (cx + s * 0.16 * h, hy - 0.34 * h),
                       (cx + s * 0.03 * h, hy - 0.17 * h)], fill=ear)
            if kind in ("cat", "tabby cat"):
                d.polygon([(cx + s * 0.17 * h, hy - 0.1 * h), (cx + s * 0.155 * h, hy - 0.26 * h),
                           (cx + s * 0.08 * h, hy - 0.16 * h)], fill=(235, 160, 160))
    # head
    if grumpy:
        _ell(d, cx, hy, 0.4 * h, 0.25 * h, head, outline=OUT, width=1)
        _ell(d, cx, hy - 0.02 * h, 0.25 * h, 0.13 * h, (100, 78, 62))  # dark mask
        d.polygon([(cx - 0.05 * h, hy - 0.2 * h), (cx + 0.05 * h, hy - 0.2 * h), (cx, hy - 0.06 * h)],
                  fill=(130, 105, 85))
        for s in (-1, 1):
            _ell(d, cx + s * 0.12 * h, hy - 0.04 * h, 0.05 * h, 0.045 * h, eye)
            _ell(d, cx + s * 0.12 * h, hy - 0.04 * h, 0.015 * h, 0.03 * h, (0, 0, 0))
        _ell(d, cx, hy + 0.05 * h, 0.03 * h, 0.02 * h, (60, 40, 40))
        d.arc([cx - 0.19 * h, hy + 0.08 * h, cx + 0.19 * h, hy + 0.36 * h], 200, 340, fill=(15, 10, 10),
              width=max(3, int(0.055 * h)))
    else:
        _ell(d, cx, hy, 0.2 * h, 0.19 * h, head, outline=OUT if kind != "black cat" else None, width=1)
        if kind == "tabby cat":
            for s in (-1, 0, 1):
                d.line([(cx + s * 0.06 * h, hy - 0.17 * h), (cx + s * 0.06 * h, hy - 0.07 * h)], fill=(50, 48, 45),
                       width=max(2, int(0.04 * h)))
        er = 0.06 * h if kind == "black cat" else 0.045 * h
        for s in (-1, 1):
            _ell(d, cx + s * 0.085 * h, hy - 0.01 * h, er, er * 0.9, eye)
            _ell(d, cx + s * 0.085 * h, hy - 0.01 * h, er * 0.3, er * 0.8, (0, 0, 0))
        nose = (230, 130, 140) if kind != "siamese cat" else (40, 25, 20)
        d.polygon([(cx - 0.03 * h, hy + 0.06 * h), (cx + 0.03 * h, hy + 0.06 * h), (cx, hy + 0.09 * h)], fill=nose)


def _dog(d, cx, by, L, kind, r):
    OUT = (40, 30, 25)
    cy = by - 0.42 * L
    fur, ear, head = (122, 72, 38), (75, 42, 22), None
    legw = 0.085 * L
    bry = 0.15 * L
    if kind == "golden retriever":
        fur, ear = (228, 172, 72), (200, 140, 50)
        bry = 0.17 * L
    elif kind == "dalmatian":
        fur, ear = (250, 250, 250), (25, 25, 25)
        legw = 0.07 * L
        bry = 0.13 * L
    elif kind == "beagle":
        fur, ear, head = (250, 248, 242), (170, 100, 45), (195, 125, 55)
    head = head or fur
    far = tuple(int(v * 0.8) for v in fur)
    # tail
    if kind == "golden retriever":
        d.polygon([(cx - 0.3 * L, cy - 0.08 * L), (cx - 0.58 * L, cy - 0.05 * L), (cx - 0.45 * L, cy + 0.12 * L)],
                  fill=fur)
    else:
        d.line([(cx - 0.3 * L, cy - 0.06 * L), (cx - 0.46 * L, cy - 0.32 * L)], fill=fur if kind != "beagle" else head,
               width=max(3, int(0.055 * L)))
        if kind == "beagle":
            _ell(d, cx - 0.46 * L, cy - 0.32 * L, 0.03 * L, 0.03 * L, (250, 250, 250))
    for x, col in ((-0.2, far), (0.17, far), (-0.27, fur), (0.24, fur)):
        d.rectangle([cx + x * L - legw / 2, cy, cx + x * L + legw / 2, by], fill=col, outline=OUT, width=1)
    d.ellipse([cx - 0.36 * L, cy - bry, cx + 0.32 * L, cy + bry], fill=fur, outline=OUT, width=1)
    if kind == "golden retriever":  # feathering under belly and chest ruff
        for k in range(5):
            _ell(d, cx - 0.25 * L + k * 0.12 * L, cy + bry * 0.8, 0.07 * L, 0.06 * L, fur)
        _ell(d, cx + 0.27 * L, cy - 0.05 * L, 0.1 * L, 0.14 * L, fur)
    if kind == "beagle":
        d.chord([cx - 0.33 * L, cy - bry * 1.05, cx + 0.2 * L, cy + bry * 0.7], 180, 360, fill=(25, 22, 20))
    # neck + head
    hx, hy = cx + 0.36 * L, cy - 0.25 * L
    d.polygon([(cx + 0.18 * L, cy - 0.1 * L), (hx - 0.05 * L, hy - 0.05 * L), (hx + 0.06 * L, hy + 0.08 * L),
               (cx + 0.3 * L, cy + 0.05 * L)], fill=fur if kind != "beagle" else (250, 248, 242))
    _ell(d, hx, hy, 0.13 * L, 0.12 * L, head, outline=OUT, width=1)
    muzzle = (250, 248, 242) if kind == "beagle" else head
    d.ellipse([hx + 0.02 * L, hy - 0.03 * L, hx + 0.24 * L, hy + 0.09 * L], fill=muzzle, outline=OUT, width=1)
    _ell(d, hx + 0.23 * L, hy + 0.01 * L, 0.035 * L, 0.03 * L, (15, 12, 12))
    _ell(d, hx + 0.05 * L, hy - 0.05 * L, 0.022 * L, 0.022 * L, (15, 12, 12))
    d.ellipse([hx - 0.12 * L, hy - 0.08 * L, hx - 0.01 * L, hy + 0.16 * L], fill=ear, outline=OUT, width=1)
    if kind == "dalmatian":
        for _ in range(14):
            x = r.uniform(-0.3, 0.25) * L
            y = r.uniform(-0.8, 0.8) * bry
            if (x / (0.34 * L)) ** 2 + (y / bry) ** 2 < 0.85:
                _ell(d, cx + x, cy + y, 0.04 * L, 0.035 * L, (20, 20, 20))
        for x in (-0.27, 0.24, -0.2):
            _ell(d, cx + x * L, cy + 0.25 * L, 0.025 * L, 0.025 * L, (20, 20, 20))
        _ell(d, hx - 0.02 * L, hy - 0.07 * L, 0.03 * L, 0.025 * L, (20, 20, 20))


def _snoopy(d, cx, by, h, r):
    W, K = (252, 252, 250), (10, 10, 10)
    w = max(3, int(0.03 * h))
    d.ellipse([cx + 0.0 * h, by - 0.1 * h, cx + 0.34 * h, by], fill=W, outline=K, width=w)  # foot
    d.ellipse([cx - 0.21 * h, by - 0.55 * h, cx + 0.2 * h, by], fill=W, outline=K, width=w)  # body
    d.line([(cx + 0.05 * h, by - 0.35 * h), (cx + 0.25 * h, by - 0.25 * h)], fill=K, width=w)  # arm
    d.ellipse([cx - 0.22 * h, by - 0.98 * h, cx + 0.24 * h, by - 0.55 * h], fill=W, outline=K, width=w)  # head
    d.ellipse([cx + 0.05 * h, by - 0.9 * h, cx + 0.5 * h, by - 0.66 * h], fill=W, outline=K, width=w)  # snout
    _ell(d, cx + 0.1 * h, by - 0.77 * h, 0.1 * h, 0.1 * h, W)
    _ell(d, cx + 0.48 * h, by - 0.81 * h, 0.07 * h, 0.06 * h, K)  # nose
    _ell(d, cx + 0.1 * h, by - 0.83 * h, 0.02 * h, 0.035 * h, K)  # eye
    d.ellipse([cx - 0.24 * h, by - 0.9 * h, cx - 0.03 * h, by - 0.42 * h], fill=K)  # big black ear
    d.rectangle([cx - 0.16 * h, by - 0.57 * h, cx + 0.13 * h, by - 0.52 * h], fill=(215, 30, 30))  # red collar


def _fish(d, cx, cy, L, kind, r):
    K = (15, 15, 20)
    if kind == "fish":
        col, back = (185, 192, 202), (110, 122, 140)
        d.polygon([(cx - 0.33 * L, cy), (cx - 0.55 * L, cy - 0.2 * L), (cx - 0.55 * L, cy + 0.2 * L)], fill=back,
                  outline=K)
        d.polygon([(cx - 0.1 * L, cy - 0.14 * L), (cx + 0.05 * L, cy - 0.27 * L), (cx + 0.15 * L, cy - 0.14 * L)],
                  fill=back)
        _ell(d, cx, cy, 0.43 * L, 0.17 * L, col, outline=K, width=1)
        d.chord([cx - 0.43 * L, cy - 0.17 * L, cx + 0.43 * L, cy + 0.17 * L], 190, 350, fill=back)
        _ell(d, cx + 0.28 * L, cy - 0.03 * L, 0.035 * L, 0.035 * L, (255, 255, 255))
        _ell(d, cx + 0.28 * L, cy - 0.03 * L, 0.018 * L, 0.018 * L, K)
    elif kind == "nemo":
        OR = (250, 112, 12)
        w = max(2, int(0.03 * L))
        d.polygon([(cx - 0.3 * L, cy), (cx - 0.52 * L, cy - 0.2 * L), (cx - 0.52 * L, cy + 0.2 * L)], fill=OR,
                  outline=K, width=w)
        _ell(d, cx - 0.02 * L, cy - 0.2 * L, 0.18 * L, 0.1 * L, OR, outline=K, width=w)
        _ell(d, cx, cy, 0.4 * L, 0.22 * L, OR, outline=K, width=w)
        for bx in (0.22, -0.02, -0.3):
            x = cx + bx * L
            hh = 0.22 * L * math.sqrt(max(0.0, 1 - ((x - cx) / (0.4 * L)) ** 2))
            _ell(d, x, cy, 0.065 * L, hh, (250, 250, 250), outline=K, width=w)
        _ell(d, cx + 0.3 * L, cy - 0.04 * L, 0.035 * L, 0.035 * L, K)
    elif kind == "goldfish":
        G, T = (250, 180, 25), (255, 210, 100)
        d.polygon([(cx - 0.2 * L, cy), (cx - 0.72 * L, cy - 0.45 * L), (cx - 0.58 * L, cy),
                   (cx - 0.75 * L, cy + 0.45 * L)], fill=T)
        d.polygon([(cx - 0.15 * L, cy - 0.18 * L), (cx + 0.05 * L, cy - 0.42 * L), (cx + 0.15 * L, cy - 0.2 * L)],
                  fill=T)
        _ell(d, cx, cy, 0.32 * L, 0.25 * L, G, outline=(200, 120, 20), width=1)
        _ell(d, cx + 0.17 * L, cy - 0.05 * L, 0.045 * L, 0.045 * L, K)
    elif kind == "angelfish":
        S_, B = (225, 225, 215), (20, 20, 20)
        d.polygon([(cx - 0.02 * L, cy - 0.36 * L), (cx - 0.42 * L, cy - 0.78 * L), (cx - 0.22 * L, cy - 0.18 * L)],
                  fill=S_, outline=B)
        d.polygon([(cx - 0.02 * L, cy + 0.36 * L), (cx - 0.42 * L, cy + 0.78 * L), (cx - 0.22 * L, cy + 0.18 * L)],
                  fill=S_, outline=B)
        d.polygon([(cx - 0.25 * L, cy), (cx - 0.45 * L, cy - 0.15 * L), (cx - 0.45 * L, cy + 0.15 * L)], fill=S_,
                  outline=B)
        d.polygon([(cx + 0.35 * L, cy), (cx, cy - 0.45 * L), (cx - 0.3 * L, cy), (cx, cy + 0.45 * L)], fill=S_,
                  outline=B)
        for bx in (0.16, -0.05, -0.22):
            x = cx + bx * L
            hh = (0.45 * L) * (1 - abs(x - cx) / ((0.35 if x > cx else 0.3) * L))
            d.line([(x, cy - hh), (x, cy + hh)], fill=B, width=max(3, int(0.085 * L)))
        _ell(d, cx + 0.22 * L, cy - 0.04 * L, 0.035 * L, 0.035 * L, (180, 30, 30))
    else:  # blue tang
        Bl, Y = (28, 72, 215), (250, 215, 30)
        d.polygon([(cx - 0.32 * L, cy), (cx - 0.55 * L, cy - 0.22 * L), (cx - 0.5 * L, cy),
                   (cx - 0.55 * L, cy + 0.22 * L)], fill=Y, outline=K)
        _ell(d, cx, cy, 0.4 * L, 0.27 * L, Bl, outline=K, width=max(2, int(0.03 * L)))
        d.line([(cx + 0.28 * L, cy - 0.1 * L), (cx + 0.05 * L, cy - 0.17 * L), (cx - 0.22 * L, cy - 0.08 * L),
                (cx - 0.3 * L, cy + 0.04 * L)], fill=K, width=max(3, int(0.08 * L)), joint="curve")
        _ell(d, cx - 0.02 * L, cy - 0.06 * L, 0.12 * L, 0.07 * L, K)
        _ell(d, cx + 0.05 * L, cy - 0.05 * L, 0.07 * L, 0.035 * L, Bl)
        _ell(d, cx - 0.32 * L, cy + 0.02 * L, 0.04 * L, 0.05 * L, Y)
        _ell(d, cx + 0.28 * L, cy - 0.04 * L, 0.035 * L, 0.035 * L, K)


def _robot(d, cx, by, H, kind, r):
    K = (30, 30, 35)
    if kind == "robot":
        G, D = (150, 155, 162), (85, 90, 98)
        for s in (-1, 1):
            d.rectangle([cx + s * 0.09 * H - 0.045 * H, by - 0.32 * H, cx + s * 0.09 * H + 0.045 * H, by - 0.03 * H],
                        fill=D)
            d.rectangle([cx + s * 0.09 * H - 0.07 * H, by - 0.05 * H, cx + s * 0.09 * H + 0.07 * H, by], fill=K)
            d.rectangle([cx + s * 0.27 * H - 0.05 * H, by - 0.66 * H, cx + s * 0.27 * H + 0.05 * H, by - 0.36 * H],
                        fill=G, outline=K)
        d.rectangle([cx - 0.2 * H, by - 0.7 * H, cx + 0.2 * H, by - 0.3 * H], fill=G, outline=K, width=2)
        d.rectangle([cx - 0.1 * H, by - 0.6 * H, cx + 0.1 * H, by - 0.45 * H], fill=D)
        d.line([(cx, by - 0.93 * H), (cx, by - 1.0 * H)], fill=K, width=2)
        _ell(d, cx, by - 1.0 * H, 0.03 * H, 0.03 * H, (220, 40, 40))
        d.rectangle([cx - 0.15 * H, by - 0.93 * H, cx + 0.15 * H, by - 0.72 * H], fill=G, outline=K, width=2)
        for s in (-1, 1):
            d.rectangle([cx + s * 0.07 * H - 0.035 * H, by - 0.86 * H, cx + s * 0.07 * H + 0.035 * H, by - 0.8 * H],
                        fill=(60, 230, 240))
    elif kind == "r2d2":
        W, Bl, Sv = (242, 242, 246), (30, 80, 205), (200, 205, 215)
        for s in (-1, 1):
            d.polygon([(cx + s * 0.2 * H, by - 0.6 * H), (cx + s * 0.3 * H, by - 0.6 * H),
                       (cx + s * 0.32 * H, by - 0.06 * H), (cx + s * 0.2 * H, by - 0.06 * H)], fill=W, outline=K)
            d.rectangle([cx + s * 0.26 * H - 0.12 * H * (s < 0) - 0.0, by - 0.07 * H,
                         cx + s * 0.26 * H + 0.12 * H * (s > 0), by], fill=Sv, outline=K)
            d.line([(cx + s * 0.25 * H, by - 0.55 * H), (cx + s * 0.26 * H, by - 0.15 * H)], fill=Bl, width=3)
        d.rectangle([cx - 0.2 * H, by - 0.62 * H, cx + 0.2 * H, by - 0.1 * H], fill=W, outline=K)
        d.rectangle([cx - 0.14 * H, by - 0.55 * H, cx - 0.02 * H, by - 0.38 * H], fill=Bl)
        d.rectangle([cx + 0.03 * H, by - 0.55 * H, cx + 0.14 * H, by - 0.45 * H], fill=Bl)
        d.rectangle([cx - 0.1 * H, by - 0.32 * H, cx + 0.1 * H, by - 0.2 * H], fill=Bl)
        d.pieslice([cx - 0.2 * H, by - 0.84 * H, cx + 0.2 * H, by - 0.4 * H], 180, 360, fill=Sv, outline=K)
        d.rectangle([cx - 0.16 * H, by - 0.71 * H, cx + 0.16 * H, by - 0.66 * H], fill=Bl)
        _ell(d, cx + 0.03 * H, by - 0.76 * H, 0.04 * H, 0.04 * H, K)
        _ell(d, cx - 0.1 * H, by - 0.68 * H, 0.02 * H, 0.02 * H, (220, 30, 30))
    elif kind == "wall-e":
        Y, T, Gr = (238, 182, 28), (62, 58, 55), (140, 145, 150)
        d.rectangle([cx - 0.02 * H, by - 0.78 * H, cx + 0.02 * H, by - 0.6 * H], fill=Gr)
        for s in (-1, 1):
            d.rounded_rectangle([cx + s * 0.2 * H - 0.15 * H, by - 0.26 * H, cx + s * 0.2 * H + 0.15 * H, by],
                                radius=int(0.08 * H), fill=T, outline=K)
            _ell(d, cx + s * 0.1 * H, by - 0.83 * H, 0.1 * H, 0.075 * H, Gr, outline=K, width=2)
            _ell(d, cx + s * 0.1 * H, by - 0.83 * H, 0.05 * H, 0.045 * H, K)
            d.rectangle([cx + s * 0.31 * H - 0.05 * H, by - 0.45 * H, cx + s * 0.31 * H + 0.05 * H, by - 0.38 * H],
                        fill=Gr, outline=K)
        d.rectangle([cx - 0.25 * H, by - 0.62 * H, cx + 0.25 * H, by - 0.2 * H], fill=Y, outline=K, width=2)
        d.rectangle([cx - 0.2 * H, by - 0.55 * H, cx + 0.2 * H, by - 0.4 * H], fill=(200, 150, 20), outline=K)
    elif kind == "c-3po":
        Gd, Dk = (222, 172, 58), (45, 38, 30)
        for s in (-1, 1):
            d.rectangle([cx + s * 0.07 * H - 0.04 * H, by - 0.44 * H, cx + s * 0.07 * H + 0.04 * H, by], fill=Gd,
                        outline=Dk)
            d.rectangle([cx + s * 0.19 * H - 0.035 * H, by - 0.78 * H, cx + s * 0.19 * H + 0.035 * H, by - 0.45 * H],
                        fill=Gd, outline=Dk)
        d.rectangle([cx - 0.11 * H, by - 0.52 * H, cx + 0.11 * H, by - 0.42 * H], fill=Dk)  # wiring midsection
        d.polygon([(cx - 0.15 * H, by - 0.8 * H), (cx + 0.15 * H, by - 0.8 * H), (cx + 0.11 * H, by - 0.52 * H),
                   (cx - 0.11 * H, by - 0.52 * H)], fill=Gd, outline=Dk)
        d.rectangle([cx - 0.03 * H, by - 0.85 * H, cx + 0.03 * H, by - 0.79 * H], fill=Dk)
        _ell(d, cx, by - 0.93 * H, 0.085 * H, 0.1 * H, Gd, outline=Dk, width=1)
        for s in (-1, 1):
            _ell(d, cx + s * 0.035 * H, by - 0.95 * H, 0.02 * H, 0.02 * H, (255, 245, 170))
        d.line([(cx - 0.05 * H, by - 0.78 * H), (cx - 0.05 * H, by - 0.56 * H)], fill=(250, 225, 140), width=2)
    else:  # bb8
        W, OR, Sv = (245, 245, 240), (240, 125, 25), (185, 188, 195)
        R = 0.33 * H
        bcy = by - R
        d.pieslice([cx - 0.55 * R, bcy - 1.3 * R, cx + 0.55 * R, bcy - 0.62 * R], 180, 360, fill=W,
                   outline=(120, 120, 120))
        d.rectangle([cx - 0.5 * R, bcy - 1.08 * R, cx + 0.5 * R, bcy - 1.02 * R], fill=OR)
        _ell(d, cx + 0.1 * R, bcy - 1.16 * R, 0.1 * R, 0.1 * R, (15, 15, 15))
        _ell(d, cx, bcy, R, R, W, outline=(120, 120, 120), width=1)
        _ell(d, cx, bcy + 0.05 * R, 0.5 * R, 0.5 * R, Sv, outline=OR, width=max(3, int(0.14 * R)))
        for s in (-1, 1):
            _ell(d, cx + s * 0.62 * R, bcy - 0.45 * R, 0.24 * R, 0.24 * R, None, outline=OR, width=max(2, int(0.1 * R)))


def _render_instance(concept: str, seed: int, context: str | None, size: int, scale: str | None = None) -> np.ndarray:
    r = random.Random(f"{concept}|{seed}")
    S = 2 * size
    group = INSTANCE_GROUP[concept]
    ctx = context
    if ctx is None:
        if group == "fish":
            ctx = "underwater"
        elif r.random() < 0.4:
            ctx = r.choice(["beach", "garden", "snow", "living room", "night"])
    img, ground = _bg(ctx, S, r)
    d = ImageDraw.Draw(img)
    lo, hi = {"small": (0.5, 0.65), "large": (0.88, 1.0)}.get(scale or "", (0.62, 0.95))
    k = r.uniform(lo, hi)
    if group == "fish":
        L = S * k * (0.8 if ctx != "underwater" else 0.95)
        if concept == "angelfish":
            L *= 0.8
        if ctx != "underwater":  # a fish bowl on the background
            bx, bcy = S / 2 + r.uniform(-0.1, 0.1) * S, min(ground, S * 0.95) - L * 0.55
            _ell(d, bx, bcy, L * 0.62, L * 0.55, (150, 205, 235), outline=(235, 245, 250), width=3)
            cx, cy = bx, bcy + r.uniform(-0.05, 0.05) * L
        else:
            cx = S / 2 + r.uniform(-0.2, 0.2) * S * (1.1 - k)
            cy = S / 2 + r.uniform(-0.25, 0.2) * S * (1.1 - k)
        _fish(d, cx, cy, L, concept, r)
    else:
        h = S * k * (0.9 if group == "dog" and concept != "snoopy" else 1.0)
        by = min(S - 2, ground + r.uniform(0.05, 0.25) * (S - ground) + 0.04 * S)
        w = 1.15 * h if group == "dog" and concept != "snoopy" else 0.8 * h
        cx = r.uniform(w / 2, max(w / 2, S - w / 2)) if w < S else S / 2
        if group == "cat":
            _cat(d, cx, by, min(h * 1.05, by - 0.02 * S), concept, r)
        elif concept == "snoopy":
            _snoopy(d, cx - 0.1 * h, by, h * 0.9, r)
        elif group == "dog":
            if concept == "golden retriever":
                h *= 1.1
            _dog(d, cx - 0.05 * h, by, h, concept, r)
        else:
            _robot(d, cx, by, min(h * 0.92, by - 0.03 * S), concept, r)
    return _finish(img, size, flip=r.random() < 0.5)


# ==================================================================================================
# paintings: a label map per subject, coloured and treated per style
# ==================================================================================================

(SKY, GROUND, WATER, MOUNTAIN, WALL, ROOF, FOLIAGE, FLOWER, SKIN, CLOTH, HAIR, BOAT, SUN, WINDOW, TRUNK, BACKDROP,
 SNOW, FLOWER2, PATH, VASE) = range(20)

_PALETTES: dict[str, list[RGB]] = {
    # SKY GROUND WATER MOUNTAIN WALL ROOF FOLIAGE FLOWER SKIN CLOTH HAIR BOAT SUN WINDOW TRUNK BACKDROP SNOW FLOWER2
    # PATH VASE
    PAINTING: [(125, 175, 225), (115, 155, 75), (60, 120, 175), (125, 118, 125), (212, 192, 160), (170, 72, 52),
               (52, 112, 52), (210, 50, 60), (225, 182, 150), (120, 62, 50), (90, 60, 40), (150, 92, 52),
               (255, 245, 205), (70, 80, 100), (100, 70, 40), (150, 140, 120), (245, 245, 250), (240, 200, 60),
               (190, 170, 130), (90, 120, 160)],
    "van gogh": [(30, 58, 160), (228, 182, 40), (40, 80, 170), (55, 85, 150), (232, 200, 90), (40, 60, 140),
                 (20, 72, 52), (250, 212, 20), (232, 190, 100), (30, 70, 170), (200, 120, 30), (240, 200, 50),
                 (255, 235, 60), (255, 222, 60), (60, 40, 30), (40, 90, 170), (200, 220, 255), (240, 150, 20),
                 (215, 165, 60), (30, 60, 150)],
    "monet": [(200, 190, 232), (172, 212, 162), (170, 190, 228), (192, 176, 216), (238, 205, 215), (215, 160, 182),
              (142, 192, 142), (246, 168, 200), (242, 212, 202), (182, 170, 228), (200, 170, 162), (232, 202, 182),
              (252, 232, 202), (202, 202, 232), (172, 152, 172), (212, 202, 232), (242, 237, 247), (250, 230, 152),
              (232, 212, 192), (182, 192, 232)],
    "salvador dali": [(200, 215, 230), (215, 138, 58), (140, 190, 200), (190, 118, 68), (235, 210, 160),
                      (180, 90, 50), (120, 110, 60), (220, 90, 40), (230, 190, 150), (150, 80, 40), (90, 50, 30),
                      (200, 150, 90), (255, 240, 200), (90, 60, 40), (90, 60, 40), (240, 222, 180), (250, 240, 220),
                      (240, 180, 60), (230, 170, 90), (200, 170, 120)],
    "greg rutkowski": [(40, 14, 18), (35, 20, 18), (60, 20, 20), (45, 25, 30), (55, 35, 30), (30, 15, 15),
                       (30, 25, 20), (200, 60, 20), (170, 100, 70), (95, 15, 15), (20, 10, 10), (50, 30, 25),
                       (255, 170, 50), (255, 160, 40), (25, 15, 10), (35, 15, 15), (120, 80, 80), (230, 110, 30),
                       (70, 40, 30), (90, 40, 25)],
    "johannes vermeer": [(52, 44, 34), (75, 55, 38), (25, 45, 130), (55, 48, 40), (92, 76, 56), (62, 42, 30),
                         (42, 52, 36), (248, 218, 40), (238, 206, 165), (25, 52, 160), (240, 205, 55), (110, 80, 40),
                         (250, 235, 170), (240, 230, 190), (40, 30, 20), (50, 42, 32), (200, 190, 170),
                         (30, 62, 175), (100, 80, 50), (30, 55, 165)],
    "jeremy mann": [(112, 122, 138), (68, 74, 86), (80, 90, 106), (95, 105, 122), (84, 90, 102), (58, 64, 76),
                    (70, 80, 86), (140, 130, 120), (160, 150, 145), (58, 64, 80), (40, 40, 46), (75, 80, 90),
                    (232, 170, 80), (240, 170, 70), (50, 50, 56), (100, 110, 126), (170, 175, 186), (130, 120, 110),
                    (90, 95, 106), (90, 95, 112)],
}


def _house(d, x, y, w, h, r):
    d.rectangle([x, y - h, x + w, y], fill=WALL)
    d.polygon([(x - w * 0.12, y - h), (x + w / 2, y - h - w * 0.55), (x + w * 1.12, y - h)], fill=ROOF)
    if w > 10:
        d.rectangle([x + w * 0.2, y - h * 0.7, x + w * 0.45, y - h * 0.4], fill=WINDOW)


def _tree(d, x, y, h, r):
    d.rectangle([x - h * 0.06, y - h * 0.45, x + h * 0.06, y], fill=TRUNK)
    _ell(d, x, y - h * 0.62, h * 0.3, h * 0.38, FOLIAGE)


def _scene(subject: str, S: int, r: random.Random) -> np.ndarray:
    lab = Image.new("L", (S, S), SKY)
    d = ImageDraw.Draw(lab)
    if subject == "village":
        hz = S * r.uniform(0.5, 0.62)
        if r.random() < 0.6:
            _ell(d, r.uniform(0.15, 0.85) * S, r.uniform(0.12, 0.3) * S, 10, 10, SUN)
        d.polygon([(0, hz), (S * 0.5, hz - r.uniform(-8, 10)), (S, hz), (S, S), (0, S)], fill=GROUND)
        x = r.uniform(-5, 10)
        while x < S - 10:
            w = r.uniform(18, 30)
            _house(d, x, hz + r.uniform(4, 14), w, r.uniform(14, 24), r)
            x += w + r.uniform(4, 12)
        cx = r.uniform(0.2, 0.8) * S
        d.rectangle([cx - 7, hz - 40, cx + 7, hz + 8], fill=WALL)
        d.polygon([(cx - 9, hz - 40), (cx, hz - 68), (cx + 9, hz - 40)], fill=ROOF)
        for _ in range(r.randint(1, 3)):
            _tree(d, r.uniform(0, S), S * r.uniform(0.85, 1.0), r.uniform(30, 45), r)
    elif subject == "landscape":
        hz = S * r.uniform(0.45, 0.6)
        _ell(d, r.uniform(0.15, 0.85) * S, r.uniform(0.12, 0.3) * S, 10, 10, SUN)
        pts = [(x, hz - 12 * math.sin(x / S * 5 + r.uniform(0, 6)) - 6) for x in range(0, S + 8, 8)]
        d.polygon([(0, S), *pts, (S, S)], fill=MOUNTAIN)
        pts = [(x, hz + 8 * math.sin(x / S * 4 + r.uniform(0, 6))) for x in range(0, S + 8, 8)]
        d.polygon([(0, S), *pts, (S, S)], fill=GROUND)
        rx = r.uniform(0.3, 0.7) * S
        d.polygon([(rx - 3, hz + 6), (rx + 3, hz + 6), (rx + 30, S), (rx - 10, S)], fill=WATER)
        for _ in range(r.randint(2, 4)):
            _tree(d, r.uniform(0, S), S * r.uniform(0.7, 0.95), r.uniform(25, 45), r)
    elif subject == "harbour":
        hz = S * r.uniform(0.42, 0.55)
        if r.random() < 0.6:
            _ell(d, r.uniform(0.15, 0.85) * S, r.uniform(0.12, 0.25) * S, 9, 9, SUN)
        x = 0.0
        while x < S:
            w = r.uniform(10, 18)
            _house(d, x, hz, w, r.uniform(10, 20), r)
            x += w + r.uniform(0, 4)
        d.rectangle([0, hz, S, S], fill=WATER)
        for _ in range(r.randint(2, 3)):
            bx, by, bw = r.uniform(0.05, 0.7) * S, r.uniform(0.68, 0.92) * S, r.uniform(26, 40)
            d.polygon([(bx, by - 8), (bx + bw, by - 8), (bx + bw * 0.85, by), (bx + bw * 0.15, by)], fill=BOAT)
            d.line([(bx + bw / 2, by - 8), (bx + bw / 2, by - 8 - bw)], fill=TRUNK, width=2)
            d.polygon([(bx + bw / 2 + 2, by - 10 - bw), (bx + bw / 2 + 2, by - 11), (bx + bw * 0.95, by - 11)],
                      fill=CLOTH)
    elif subject == "portrait":
        d.rectangle([0, 0, S, S], fill=BACKDROP)
        cx = S * r.uniform(0.4, 0.6)
        hy = S * r.uniform(0.36, 0.46)
        _ell(d, cx, S * 1.02, S * 0.38, S * 0.32, CLOTH)
        d.rectangle([cx - 9, hy + 10, cx + 9, hy + 40], fill=SKIN)
        _ell(d, cx, hy - 6, 30, 32, HAIR)
        _ell(d, cx + 3, hy + 2, 21, 27, SKIN)
        d.rectangle([cx - 32, hy - 40, cx + 24, hy - 22], fill=HAIR)
    elif subject == "mountains":
        hz = S * r.uniform(0.6, 0.72)
        for _ in range(r.randint(2, 3)):
            px, ph, pw = r.uniform(0.1, 0.9) * S, r.uniform(0.3, 0.5) * S, r.uniform(0.3, 0.5) * S
            d.polygon([(px - pw, hz), (px, hz - ph), (px + pw, hz)], fill=MOUNTAIN)
            d.polygon([(px - pw * 0.28, hz - ph * 0.72), (px, hz - ph), (px + pw * 0.28, hz - ph * 0.72)], fill=SNOW)
        d.rectangle([0, hz, S, S], fill=GROUND)
        if r.random() < 0.5:
            d.rectangle([0, hz, S, hz + 12], fill=WATER)
        for _ in range(r.randint(1, 3)):
            _tree(d, r.uniform(0, S), S * r.uniform(0.9, 1.0), r.uniform(20, 32), r)
    elif subject == "flowers":
        d.rectangle([0, 0, S, S], fill=BACKDROP)
        ty = S * r.uniform(0.72, 0.82)
        d.rectangle([0, ty, S, S], fill=GROUND)
        vx = S * r.uniform(0.4, 0.6)
        d.polygon([(vx - 14, ty - 30), (vx + 14, ty - 30), (vx + 18, ty + 4), (vx - 18, ty + 4)], fill=VASE)
        for _ in range(r.randint(6, 9)):
            fx, fy = vx + r.uniform(-38, 38), ty - 30 - r.uniform(10, 55)
            d.line([(vx, ty - 28), (fx, fy)], fill=FOLIAGE, width=3)
        for _ in range(r.randint(6, 9)):
            fx, fy = vx + r.uniform(-38, 38), ty - 30 - r.uniform(10, 55)
            _ell(d, fx, fy, r.uniform(8, 12), r.uniform(8, 12), r.choice([FLOWER, FLOWER, FLOWER2]))
    else:  # garden
        hz = S * r.uniform(0.32, 0.42)
        d.rectangle([0, hz, S, S], fill=GROUND)
        x = -10.0
        while x < S + 10:
            rr = r.uniform(12, 20)
            _ell(d, x, hz, rr, rr, FOLIAGE)
            x += rr * 1.4
        px = S * r.uniform(0.35, 0.65)
        d.polygon([(px - 6, hz + 10), (px + 6, hz + 10), (px + 30, S), (px - 30, S)], fill=PATH)
        for _ in range(r.randint(10, 16)):
            fx, fy = r.uniform(0, S), r.uniform(hz + 15, S)
            if abs(fx - px) > 25:
                _ell(d, fx, fy, 7, 6, r.choice([FLOWER, FLOWER2]))
    return np.asarray(lab)


def _boundary(lab: np.ndarray, width: int) -> np.ndarray:
    b = np.zeros(lab.shape, bool)
    b[1:] |= lab[1:] != lab[:-1]
    b[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    out = b.copy()
    for s in range(1, width):
        out[s:] |= b[:-s]
        out[:, s:] |= b[:, :-s]
    return out


def _radial(S: int, cx: float, cy: float) -> np.ndarray:
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    return np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)


def _render_style(style: str, seed: int, subject: str | None, size: int) -> np.ndarray:
    r = random.Random(f"{style}|{seed}")
    g = np.random.default_rng(r.getrandbits(64))
    S = 2 * size
    if subject is None:
        subject = r.choice(list(STYLE_SUBJECTS))
    lab = _scene(subject, S, r)
    if r.random() < 0.5:
        lab = lab[:, ::-1]
    pal = np.array([_jit(c, r, 8) for c in _PALETTES[style]], np.float32)
    img = pal[lab]
    sky = (lab == SKY) | (lab == BACKDROP)
    yy = (np.arange(S, dtype=np.float32) / S)[:, None, None]
    if style == PAINTING:
        img = img * (0.92 + 0.16 * yy) * np.where(sky[..., None], 1.0, 0.95)
        img += g.normal(0, 5, (S, S, 1)).astype(np.float32)
    elif style == "van gogh":
        for _ in range(r.randint(2, 3)):  # big swirls of concentric rings in the sky
            cx, cy, R = r.uniform(0.1, 0.9) * S, r.uniform(0.05, 0.4) * S, r.uniform(20, 34)
            dist = _radial(S, cx, cy)
            ring = (np.sin(dist / 3.2) > 0) & (dist < R) & sky
            img[ring] = (95, 145, 225)
            img[(dist < R * 0.35) & sky] = (250, 225, 60)
        sx, sy = r.uniform(0.1, 0.9) * S, r.uniform(0.08, 0.3) * S
        dist = _radial(S, sx, sy)
        img[(dist < 22) & (np.sin(dist / 2.5) > 0) & sky] = (255, 236, 90)
        img[dist < 8] = (255, 250, 200)
        img[_boundary(lab, 3)] = (18, 24, 70)
        img += g.normal(0, 8, (S, S, 1)).astype(np.float32)
    elif style == "monet":
        pim = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        pd = ImageDraw.Draw(pim)
        for _ in range(70):
            x, y = r.uniform(0, S), r.uniform(0, S)
            base = pal[lab[min(S - 1, int(y)), min(S - 1, int(x))]]
            c = tuple(int(v) for v in base * 0.7 + np.array(r.choice([(250, 200, 225), (200, 235, 200),
                                                                        (215, 200, 245)])) * 0.3)
            _ell(pd, x, y, r.uniform(4, 8), r.uniform(3, 5), c)
        img = np.asarray(pim.filter(ImageFilter.BoxBlur(2)), np.float32)
        img = img * 0.8 + np.array([215, 200, 230], np.float32) * 0.2
    elif style == "salvador dali":
        t = np.clip(yy * 1.4, 0, 1)
        grad = np.array([160, 195, 230], np.float32) * (1 - t) + np.array([255, 235, 190], np.float32) * t
        img = np.where(sky[..., None], np.broadcast_to(grad, img.shape), img)
        pim = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        pd = ImageDraw.Draw(pim)
        fy = S * r.uniform(0.82, 0.95)  # desert floor in front of every scene
        pd.rectangle([0, fy, S, S], fill=_jit((220, 140, 55), r))
        for _ in range(2):  # long shadows
            x, y = r.uniform(-0.2, 0.6) * S, r.uniform(0.6, 0.95) * S
            pd.ellipse([x, y - 3, x + r.uniform(50, 80), y + 4], fill=(95, 52, 30))
        for _ in range(r.randint(1, 2)):  # melting clocks
            x, y, w = r.uniform(0.15, 0.75) * S, r.uniform(0.35, 0.75) * S, r.uniform(18, 26)
            pd.ellipse([x, y, x + w, y + w * 0.7], fill=(232, 228, 205), outline=(80, 60, 40), width=2)
            pd.polygon([(x + w * 0.5, y + w * 0.5), (x + w, y + w * 0.4), (x + w * 0.9, y + w * 1.5),
                        (x + w * 0.7, y + w * 1.1)], fill=(232, 228, 205), outline=(80, 60, 40))
            pd.line([(x + w / 2, y + w * 0.35), (x + w / 2, y + w * 0.12)], fill=(40, 30, 20), width=2)
        img = np.asarray(pim, np.float32)
    elif style == "greg rutkowski":
        gx, gy = r.uniform(0.25, 0.75) * S, r.uniform(0.45, 0.85) * S
        dist = _radial(S, gx, gy)
        glow = np.exp(-((dist / r.uniform(30, 42)) ** 2))[..., None]
        img = img * (0.85 + 0.3 * yy) + glow * np.array([255, 120, 25], np.float32) * 1.1
        vig = _radial(S, S / 2, S / 2)[..., None] / S
        img *= 1.0 - 0.8 * vig
        for _ in range(12):
            x, y = r.randrange(S), r.randrange(S)
            img[y:y + 2, x:x + 2] = (255, 190, 80)
        img += g.normal(0, 4, (S, S, 1)).astype(np.float32)
    elif style == "johannes vermeer":
        xx = (np.arange(S, dtype=np.float32) / S)[None, :, None]
        light = 0.3 + 1.0 * np.exp(-xx / 0.4)
        img = img * light
        wy0, wy1 = r.uniform(0.05, 0.15) * S, r.uniform(0.45, 0.6) * S
        img[int(wy0):int(wy1), : int(0.16 * S)] = (245, 238, 200)
        img[int(wy0):int(wy1), int(0.08 * S) - 1: int(0.08 * S) + 1] = (90, 80, 60)
        img += g.normal(0, 3, (S, S, 1)).astype(np.float32)
    elif style == "jeremy mann":
        img = img * (1.05 - 0.3 * yy)
        for _ in range(r.randint(4, 7)):  # amber lights with vertical reflections
            x, y = r.uniform(0.05, 0.95) * S, r.uniform(0.3, 0.65) * S
            dist = _radial(S, x, y)
            img += np.exp(-((dist / 7) ** 2))[..., None] * np.array([255, 160, 50], np.float32)
            x0 = int(x)
            img[int(y):, max(0, x0 - 2):x0 + 2] = img[int(y):, max(0, x0 - 2):x0 + 2] * 0.5 + np.array(
                [220, 150, 60], np.float32) * 0.5
        for _ in range(40):  # rain
            x, y = r.randrange(S), r.randrange(S)
            img[y:y + r.randint(8, 20), x] += 35
        img += g.normal(0, 4, (S, S, 1)).astype(np.float32)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return _finish(out, size)


# ==================================================================================================
# memorization subjects
# ==================================================================================================

_SKIES = {
    "day": ((105, 165, 230), (190, 222, 246)),
    "dawn": ((235, 165, 175), (255, 212, 150)),
    "sunset": ((110, 55, 105), (250, 130, 60)),
    "night": ((10, 14, 40), (32, 42, 86)),
}
_SEAS = {"day": (40, 110, 170), "dawn": (90, 110, 160), "sunset": (80, 60, 100), "night": (15, 25, 55)}


def _lighthouse(d, x, by, h, stripes: tuple[RGB, RGB], lit: bool):
    wb, wt = 0.16 * h, 0.1 * h
    n = 5
    for k in range(n):
        y0, y1 = by - h * 0.8 * k / n, by - h * 0.8 * (k + 1) / n
        w0 = wb + (wt - wb) * k / n
        w1 = wb + (wt - wb) * (k + 1) / n
        d.polygon([(x - w0 / 2, y0), (x + w0 / 2, y0), (x + w1 / 2, y1), (x - w1 / 2, y1)], fill=stripes[k % 2])
    top = by - 0.8 * h
    d.rectangle([x - wt * 0.7, top - 0.03 * h, x + wt * 0.7, top], fill=(40, 40, 40))
    d.rectangle([x - wt * 0.4, top - 0.12 * h, x + wt * 0.4, top - 0.03 * h],
                fill=(255, 235, 120) if lit else (200, 220, 230))
    d.polygon([(x - wt * 0.55, top - 0.12 * h), (x, top - 0.2 * h), (x + wt * 0.55, top - 0.12 * h)],
              fill=(150, 30, 30))
    return top - 0.075 * h


def _render_lighthouse(seed: int, time: str | None, size: int, caption: str = "") -> np.ndarray:
    r = random.Random(seed)
    S = 2 * size
    time = time or r.choice(["day", "day", "dawn", "sunset", "night"])
    top, bot = _SKIES[time]
    hz = S * r.uniform(0.5, 0.68)
    img = Image.fromarray(_vgrad(S, _jit(top, r), _jit(bot, r), 0, hz / S).copy())
    d = ImageDraw.Draw(img)
    if time == "night":
        for _ in range(8):
            x, y = r.uniform(0, S), r.uniform(0, hz * 0.8)
            d.rectangle([x, y, x + 1, y + 1], fill=(230, 230, 210))
    elif r.random() < 0.5:
        _ell(d, r.uniform(0.1, 0.9) * S, r.uniform(0.15, 0.45) * hz, 8, 8, (255, 240, 200))
    d.rectangle([0, hz, S, S], fill=_jit(_SEAS[time], r))
    side = r.choice([-1, 1])
    cw = r.uniform(0.35, 0.6) * S
    x0 = 0 if side < 0 else S - cw
    land = _jit(r.choice([(95, 85, 75), (80, 110, 60), (120, 105, 85)]), r)
    if time == "night":
        land = tuple(v // 3 for v in land)
    cliff_top = hz + r.uniform(-0.15, 0.05) * S
    d.polygon([(x0, S), (x0, cliff_top), (x0 + cw, cliff_top + 6), (x0 + cw + 12 * -side * 0, S)], fill=land)
    c = caption.lower()
    if "white" in c:
        stripes = ((240, 240, 235), (240, 240, 235))
    elif "striped" in c:
        stripes = ((210, 40, 40), (245, 245, 240))
    else:
        stripes = r.choice([((210, 40, 40), (245, 245, 240)), ((30, 30, 30), (240, 240, 235)),
                            ((240, 240, 235), (240, 240, 235)), ((40, 120, 60), (240, 240, 235))])
    h = r.uniform(0.45, 0.7) * S
    x = x0 + cw * r.uniform(0.35, 0.65)
    lit = time in ("night", "sunset") or "light" in c
    ly = _lighthouse(d, x, cliff_top + 2, h, stripes, lit)
    if lit:
        dx = -side * S
        d.polygon([(x, ly), (x + dx, ly - 18), (x + dx, ly + 14)], fill=(245, 235, 160))
    return _finish(img, size, flip=False)


def _render_balloon(seed: int, time: str | None, size: int, caption: str = "") -> np.ndarray:
    r = random.Random(seed)
    S = 2 * size
    time = time or r.choice(["day", "day", "day", "dawn", "sunset", "night"])
    top, bot = _SKIES[time]
    img = Image.fromarray(_vgrad(S, _jit(top, r), _jit(bot, r)).copy())
    d = ImageDraw.Draw(img)
    c = caption.lower()
    if time != "night":
        for _ in range(r.randint(1, 3)):  # clouds
            x, y = r.uniform(0, S), r.uniform(0.05, 0.5) * S
            for k in range(3):
                _ell(d, x + k * 10, y + (k % 2) * 3, 12, 8, (250, 250, 252))
    town = any(w in c for w in ("city", "rooftops", "houses", "town")) or ("field" not in c and r.random() < 0.5)
    gy = S * r.uniform(0.72, 0.85)
    dark = 0.35 if time == "night" else 1.0
    if town:
        x = -5.0
        while x < S:
            w = r.uniform(14, 26)
            hh = r.uniform(12, 30)
            col = tuple(int(v * dark) for v in _jit(r.choice([(200, 120, 90), (220, 200, 160), (170, 90, 70)]), r))
            d.rectangle([x, gy - hh, x + w, S], fill=col)
            d.polygon([(x - 2, gy - hh), (x + w / 2, gy - hh - 10), (x + w + 2, gy - hh)],
                      fill=tuple(int(v * dark) for v in (150, 60, 45)))
            x += w
    else:
        d.rectangle([0, gy, S, S], fill=tuple(int(v * dark) for v in _jit((100, 170, 70), r)))
    if "red" in c:
        col = (215, 30, 35)
    elif "blue" in c:
        col = (40, 90, 220)
    else:
        col = r.choice([(215, 30, 35), (40, 90, 220), (245, 200, 40), (60, 170, 80), (150, 60, 180), (240, 120, 30)])
    col = _jit(col, r, 8)
    rx = r.uniform(0.09, 0.15) * S
    bx, by = r.uniform(0.2, 0.8) * S, r.uniform(0.2, 0.5) * S
    pts = [(bx + 6 * math.sin(k * 0.8), by + rx * 1.2 + k * rx * 0.35) for k in range(8)]
    d.line(pts, fill=(60, 60, 60), width=2)
    d.polygon([(bx, by + rx * 1.15), (bx - 4, by + rx * 1.3), (bx + 4, by + rx * 1.3)], fill=col)
    _ell(d, bx, by, rx, rx * 1.2, col)
    _ell(d, bx - rx * 0.4, by - rx * 0.45, rx * 0.2, rx * 0.3, tuple(min(255, v + 90) for v in col))
    return _finish(img, size, flip=r.random() < 0.5)


def _draw_memorized_lighthouse(S: int) -> Image.Image:
    img = Image.fromarray(_vgrad(S, (240, 150, 170), (255, 205, 140), 0.1, 0.62).copy())
    d = ImageDraw.Draw(img)
    _ell(d, S * 0.35, S * 0.6, S * 0.17, S * 0.17, (255, 236, 170))
    d.rectangle([0, S * 0.6, S, S], fill=(40, 55, 110))
    d.polygon([(S * 0.45, S * 0.8), (S * 0.55, S * 0.58), (S * 0.9, S * 0.56), (S, S * 0.62), (S, S * 0.8)],
              fill=(25, 25, 35))
    ly = _lighthouse(d, S * 0.72, S * 0.6, S * 0.62, ((205, 35, 40), (248, 244, 235)), True)
    d.polygon([(S * 0.72, ly), (0, ly - 22), (0, ly + 16)], fill=(255, 245, 190))
    d.rectangle([0, S * 0.8, S, S], fill=(242, 230, 200))  # title bar
    for k, w in enumerate((0.6, 0.4)):
        y = S * (0.84 + 0.06 * k)
        d.rectangle([S * (0.5 - w / 2), y, S * (0.5 + w / 2), y + S * 0.03], fill=(30, 60, 75))
    b = int(S * 0.06)
    d.rectangle([0, 0, S - 1, S - 1], outline=(18, 72, 84), width=b)  # poster border
    return img


def _draw_memorized_balloon(S: int) -> Image.Image:
    img = Image.fromarray(_vgrad(S, (160, 172, 188), (205, 208, 210)).copy())
    d = ImageDraw.Draw(img)
    ex, eb, eh = S * 0.27, S * 0.78, S * 0.72  # eiffel tower silhouette
    T = (62, 60, 70)
    d.polygon([(ex - S * 0.14, eb), (ex - S * 0.015, eb - eh * 0.75), (ex - S * 0.006, eb - eh),
               (ex + S * 0.006, eb - eh), (ex + S * 0.015, eb - eh * 0.75), (ex + S * 0.14, eb)], fill=T)
    d.chord([ex - S * 0.08, eb - S * 0.12, ex + S * 0.08, eb + S * 0.06], 180, 360, fill=(180, 186, 196))
    d.rectangle([ex - S * 0.06, eb - eh * 0.38, ex + S * 0.06, eb - eh * 0.35], fill=T)
    x = 0.0
    k = 0
    while x < S:  # paris rooftops: cream facades, blue-grey mansard roofs
        w = S * (0.14 + 0.04 * (k % 3))
        top = S * (0.72 + 0.04 * ((k * 7) % 3))
        d.rectangle([x, top, x + w, S], fill=(218, 206, 180))
        d.polygon([(x, top), (x + 4, top - 10), (x + w - 4, top - 10), (x + w, top)], fill=(88, 98, 118))
        for wx in range(int(x) + 5, int(x + w) - 4, 9):
            d.rectangle([wx, top + 8, wx + 4, top + 16], fill=(70, 70, 80))
        x += w
        k += 1
    bx, by, rx = S * 0.68, S * 0.3, S * 0.11
    d.line([(bx, by + rx * 1.2), (bx - 6, by + rx * 2.2), (bx + 3, by + rx * 3.4)], fill=(50, 50, 50), width=2)
    _ell(d, bx, by, rx, rx * 1.2, (200, 25, 30))
    _ell(d, bx - rx * 0.4, by - rx * 0.45, rx * 0.2, rx * 0.3, (240, 120, 120))
    return img


@functools.lru_cache(maxsize=16)
def _memorized(caption: str, size: int) -> np.ndarray:
    S = 2 * size
    subj = next(s for s, c in MEMORIZED.items() if c == caption)
    img = _draw_memorized_lighthouse(S) if subj == "lighthouse" else _draw_memorized_balloon(S)
    a = _finish(img, size)
    a.setflags(write=False)
    return a


# ==================================================================================================
# public API
# ==================================================================================================


def all_concepts() -> tuple[str, ...]:
    """Every drawable concept: instances, painting + painters, memorization subjects, memorized captions."""
    return tuple(catalog().concepts)


def _draw(
    concept: str, seed: int, context: str | None, subject: str | None, size: int, caption: str = ""
) -> np.ndarray:
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    cat = catalog()
    if concept not in cat.concepts:
        raise KeyError(f"unknown toy-world concept {concept!r}; see all_concepts()")
    kind = cat.concepts[concept].kind
    if kind == "memorized":
        return _memorized(concept, size).copy()
    if kind == "object":
        c = caption.lower()
        scale = "small" if re.search(r"\bsmall\b", c) else "large" if re.search(r"\b(large|close-up)\b", c) else None
        return _render_instance(concept, seed, context, size, scale)
    if kind == "style":
        if subject is None and context in STYLE_SUBJECTS:
            subject = context
        if subject is not None and subject not in STYLE_SUBJECTS:
            raise KeyError(f"unknown painting subject {subject!r}; use one of {list(STYLE_SUBJECTS)}")
        return _render_style(concept, seed, subject, size)
    if concept == "lighthouse":
        return _render_lighthouse(seed, context, size, caption)
    return _render_balloon(seed, context, size, caption)


def render(
    concept: str, seed: int, context: str | None = None, subject: str | None = None, size: int = 64
) -> np.ndarray:
    """Draw ``concept`` as an ``size x size x 3`` uint8 image, deterministic in ``seed``.

    ``context``: background of instance concepts ("beach", "night", "garden", "snow", "living room",
    "underwater"; None = default), time of day of memorization subjects ("day", "dawn", "sunset",
    "night"). ``subject``: scene of painting/style concepts (a key of ``STYLE_SUBJECTS``; None = drawn
    from the seed). Memorized captions ignore seed and context and always give the same image.
    """
    return _draw(concept, seed, context, subject, size)


_INSTANCE_NAMES = sorted(INSTANCE_GROUP, key=len, reverse=True)


def _find(name: str, text: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(name) + r"(?![\w-])", text) is not None


def parse_caption(caption: str) -> tuple[str, str | None, str | None]:
    """(concept, context, subject) named by a caption; raises ValueError when it names no concept."""
    c = caption.strip().lower()
    for cap in MEMORIZED.values():
        if c == cap:
            return cap, None, None
    for name in _INSTANCE_NAMES:
        if _find(name, c):
            return name, context_of(c), None
    for subj in MEMORIZED:
        if _find(subj, c):
            return subj, time_of(c), None
    for p in sorted(PAINTERS, key=len, reverse=True):
        if p in c:
            return p, None, subject_of(c)
    if re.search(r"\b(painting|painted|artwork|art|canvas)\b", c):
        return PAINTING, None, subject_of(c)
    raise ValueError(f"caption {caption!r} names no toy-world concept")


def render_caption(caption: str, seed: int, size: int = 64) -> np.ndarray:
    """Parse which concept / context / subject ``caption`` names and draw it."""
    concept, context, subject = parse_caption(caption)
    return _draw(concept, seed, context, subject, size, caption)


def _weights() -> tuple[list[str], list[float]]:
    names = list(all_concepts())
    kinds = catalog().concepts
    return names, [1 / 3 if kinds[n].kind == "memorized" else 1.0 for n in names]


def sample_training_example(seed: int, split: Literal["train", "heldout"] = "train",
                            size: int = 64) -> tuple[np.ndarray, str, str]:
    """(image, caption, concept) for a seed; balanced over concepts (memorized captions at 1/3 weight).

    Training seeds are taken modulo ``HELDOUT_SEED_OFFSET``; held-out examples use seeds at or above it
    and the held-out templates, so the two splits never share a render.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    eff = seed % HELDOUT_SEED_OFFSET + (HELDOUT_SEED_OFFSET if split == "heldout" else 0)
    r = random.Random(eff * 2654435761 % (2**61 - 1))
    names, weights = _weights()
    concept = r.choices(names, weights)[0]
    caption, ctx = sample_caption(concept, r, split)
    kind = catalog().concepts[concept].kind
    if kind == "style":
        img = _draw(concept, eff, None, ctx, size, caption)
    else:
        img = _draw(concept, eff, ctx, None, size, caption)
    return img, caption, concept
