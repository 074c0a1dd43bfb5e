"""The embedded demo catalogue: synthetic, deterministic product-like photos of automotive parts.

``generate_demo_catalogue(out_dir)`` renders about 60 part categories (long-tailed: a few with 40+
photos, many with 2-5, some with exactly 1) into ``<out_dir>/<Category Name>/<nnn>.<jpg|png>``. Nothing is
downloaded: every photo is drawn with Pillow from a NumPy RNG seeded with ``(seed, category, photo)``, so the
same seed gives byte-identical files on the same Pillow/NumPy build.

Every category has a shape kind (disc, vented rotor, gear, ring, cylinder, lens, spring, rod, hex nut, bracket,
...) plus fixed category-specific parameters (tooth count, hole count, colour, proportions), so categories are
distinguishable while categories of the same kind are look-alikes. Within a category each photo varies in
rotation, scale, aspect ratio, canvas size, lighting gradient, blur, noise, shadow and off-white background.

The set also holds the file formats and defects real catalogues have: mostly RGB JPEG, some PNG with an
alpha channel (transparent background), some palette ("P") PNG, some CMYK JPEG, some JPEGs stored rotated
with an EXIF Orientation tag (6 or 8), exactly one photo filed under two categories (identical bytes) and
exactly one truncated JPEG (cut to about half its bytes, so ``Image.open(p).load()`` fails).

Command line: ``python -m partmatch.demo OUT_DIR [--seed N] [--size PX] [--scale F]``.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shutil
import sys
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# --------------------------------------------------------------------------------------------------------------
# The spec table: (category name, shape kind, photos at scale 1.0). Order is the rendering order.
# --------------------------------------------------------------------------------------------------------------
DEMO_CATEGORIES: list[tuple[str, str, int]] = [
    # the head of the long tail
    ("Brake Rotor", "rotor", 62),
    ("Brake Disc", "rotor", 48),
    ("Spark Plug", "plug", 45),
    ("Oil Filter", "cylinder", 42),
    # middle
    ("Headlight Lens", "lens", 30),
    ("Wheel Bearing", "ring", 26),          # excluded family: Bearing
    ("Gear", "gear", 25),
    ("Brake Pad Set", "pad", 22),           # excluded family: Set
    ("Mounting Bracket", "bracket", 21),
    ("Piston", "cylinder", 19),
    ("Timing Belt", "belt", 17),            # excluded family: Belt
    ("Hubcap", "disc", 16),
    ("Wheel Rim", "disc", 15),
    ("Control Arm", "arm", 13),             # excluded family: Arm
    ("Alarm Siren", "horn", 12),            # look-alike: 'arm' inside a word
    ("Sprocket", "gear", 12),
    ("Cylinder Liner", "cylinder", 11),
    ("Fan Blade", "blade", 11),
    ("Tail Lamp Lens", "lens", 10),
    ("Driveshaft", "rod", 10),              # excluded family: Shaft (compound)
    ("Armrest", "panel", 9),                # look-alike: starts with 'Arm'
    ("Radiator Cap", "disc", 9),
    ("Muffler", "cylinder", 8),
    ("Flywheel", "gear", 8),
    ("Sway Bar Link", "rod", 8),            # excluded family: Link
    ("Hex Nut", "hex", 7),
    ("Coil Spring", "spring", 7),
    ("Clutch Plate", "disc", 6),
    ("Harmonic Balancer", "disc", 6),       # look-alike: 'arm' inside a word
    ("Sunset Visor", "panel", 6),           # look-alike: 'set' inside a word
    ("Heater Hose", "hose", 6),             # excluded family: Hose
    # the long tail: 2-5 photos
    ("Bolt", "hex", 5),
    ("Washer", "ring", 5),
    ("Axle Seal", "ring", 5),               # excluded family: Seal
    ("Sensor", "box", 5),
    ("Bulb", "bulb", 5),
    ("Grille", "grille", 5),
    ("Pulley", "disc", 4),
    ("Valve", "rod", 4),
    ("Gasket Kit", "ring", 4),              # excluded family: Kit
    ("Relay", "box", 4),
    ("Mirror Glass", "lens", 4),
    ("Wiper Blade", "rod", 4),
    ("Emblem", "star", 4),
    ("Thermostat", "cylinder", 3),
    ("Switch", "box", 3),
    ("Fog Lamp", "lens", 3),
    ("Horn", "horn", 3),
    ("Injector", "plug", 3),
    ("Caliper", "pad", 3),
    ("Tie Strap", "strap", 3),              # excluded family: Strap
    ("Water Pump Impeller", "blade", 3),
    ("Catalytic Converter", "cylinder", 2),
    ("Ignition Coil", "box", 2),
    ("Distributor Cap", "horn", 2),
    ("Brake Drum", "disc", 2),
    ("Strut Mount Bushing", "ring", 2),     # excluded family: Bushing
    ("Fuse", "box", 2),
    # singletons (dropped by ingestion's min_images_per_class=2)
    ("Glow Plug", "plug", 1),
    ("Master Cylinder", "cylinder", 1),
    ("Door Handle", "panel", 1),
    ("Knob", "disc", 1),
    ("Fuel Cap", "disc", 1),
]

# Category names that belong to the study's excluded keyword families, and look-alikes that must survive.
EXCLUDED_FAMILY_EXAMPLES = ["Axle Seal", "Wheel Bearing", "Driveshaft", "Heater Hose", "Control Arm",
                            "Brake Pad Set", "Timing Belt", "Sway Bar Link", "Strut Mount Bushing", "Gasket Kit",
                            "Tie Strap"]
LOOK_ALIKES = ["Alarm Siren", "Armrest", "Sunset Visor", "Harmonic Balancer"]

# The special files, each in a distinct kept (non-excluded) category so they never collide at any scale.
DUPLICATE_SOURCE = ("Brake Rotor", 0)      # this photo ...
DUPLICATE_TARGET = ("Brake Disc", -1)      # ... is also filed (identical bytes) as Brake Disc's last photo
TRUNCATED = ("Spark Plug", -1)             # cut to about half its bytes
FORCED_FORMATS = {                         # guarantee every format exists even in a tiny (scale=0.01) catalogue
    ("Oil Filter", 0): "jpeg_cmyk",
    ("Headlight Lens", 0): "jpeg_exif_rotated",
    ("Gear", 0): "png_rgba",
    ("Mounting Bracket", 0): "png_palette",
    ("Brake Rotor", 0): "jpeg",
    ("Brake Disc", -1): "jpeg",
    ("Spark Plug", -1): "jpeg",
}
# Share of every other photo per format (cumulative draw in this order).
FORMAT_SHARES = [("png_rgba", 0.07), ("png_palette", 0.05), ("jpeg_cmyk", 0.04), ("jpeg_exif_rotated", 0.05)]
JPEG_QUALITY = 90
EXTENSIONS = {"jpeg": "jpg", "jpeg_cmyk": "jpg", "jpeg_exif_rotated": "jpg", "jpeg_truncated": "jpg",
              "png_rgba": "png", "png_palette": "png"}

# Per-category parameter overrides where the random draw would not be realistic.
_OVERRIDES: dict[str, dict] = {
    "Hex Nut": {"shaft": False},
    "Bolt": {"shaft": True},
    "Wheel Bearing": {"balls": 9, "lip": False},
    "Axle Seal": {"balls": 0, "lip": True},
    "Strut Mount Bushing": {"balls": 0, "lip": True, "inner": 0.35},
    "Washer": {"balls": 0, "lip": False, "inner": 0.5},
    "Gasket Kit": {"balls": 0, "lip": False, "inner": 0.8},
    "Sprocket": {"pointy": True, "teeth": 28},
    "Flywheel": {"pointy": False, "teeth": 60, "depth": 0.05, "holes": 6},
    "Gear": {"pointy": False},
    "Brake Disc": {"rows": 1},
    "Brake Rotor": {"rows": 2},
    "Valve": {"ends": ("disc", "plain")},
    "Wiper Blade": {"ends": ("blade", "eye"), "thick": 0.05},
    "Driveshaft": {"ends": ("spline", "spline"), "boots": 2},
    "Sway Bar Link": {"ends": ("ball", "ball"), "boots": 0},
    "Sunset Visor": {"mirror": True},
    "Armrest": {"mirror": False, "seams": True},
    "Caliper": {"pistons": 2},
    "Brake Pad Set": {"pistons": 0},
    "Wheel Rim": {"windows": 6, "rim": True},
    "Hubcap": {"windows": 0, "rim": True},
    "Clutch Plate": {"windows": 0, "springs": 6},
    "Headlight Lens": {"tint": (225, 230, 238)},
    "Tail Lamp Lens": {"tint": (200, 35, 35)},
    "Fog Lamp": {"tint": (240, 190, 60)},
    "Mirror Glass": {"tint": (170, 185, 200)},
}

# Kinds that look alike under any rotation get a full turn; the others lie roughly upright, like product shots.
_ROUND_KINDS = {"disc", "rotor", "gear", "ring", "blade", "horn", "star"}
_CANVAS_ASPECTS = [(1.0, 1.0), (1.25, 0.9375), (0.9375, 1.171875), (1.171875, 0.875), (1.0, 0.78125), (0.8, 1.0)]

METALS = [(150, 150, 156), (122, 124, 130), (176, 172, 164), (98, 100, 106), (165, 145, 112), (190, 192, 198)]
DARKS = [(42, 42, 44), (58, 54, 50), (32, 34, 38), (70, 66, 62)]
PLASTICS = [(30, 30, 32), (222, 222, 216), (40, 80, 160), (180, 42, 40), (228, 196, 44), (44, 120, 64),
            (90, 90, 96)]
FABRICS = [(70, 62, 55), (150, 140, 120), (40, 40, 48), (190, 180, 160)]
CLEAR = (0, 0, 0, 0)


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % 2**32, *[int(k) % 2**32 for k in keys]])


def _name_key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _jitter_colour(rng: np.random.Generator, colour, amount: int = 12) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _shade(colour, factor: float) -> tuple[int, int, int, int]:
    return (*[int(np.clip(c * factor, 0, 255)) for c in colour[:3]], 255)


def _solid(colour) -> tuple[int, int, int, int]:
    return (*[int(c) for c in colour[:3]], 255)


def _circle(d: ImageDraw.ImageDraw, x: float, y: float, r: float, fill=None, outline=None, width: int = 1) -> None:
    d.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=outline, width=width)


def _polar(c: float, r: float, angle: float) -> tuple[float, float]:
    return c + r * math.cos(angle), c + r * math.sin(angle)


def _count(n: int, scale: float) -> int:
    return max(1, int(math.floor(n * scale + 0.5)))


def _index(spec_index: int, n: int) -> int:
    return spec_index if spec_index >= 0 else n + spec_index


# --------------------------------------------------------------------------------------------------------------
# category parameters (fixed per category) and shape drawers (one per kind)
# --------------------------------------------------------------------------------------------------------------
def _category_params(name: str, kind: str, seed: int) -> dict:
    r = _rng(seed, _name_key(name), 0xC0FFEE)
    u = lambda lo, hi: float(r.uniform(lo, hi))  # noqa: E731
    p: dict = {"kind": kind}
    if kind == "disc":
        p.update(hole=u(0.08, 0.22), bolts=int(_pick(r, [0, 3, 4, 5, 6, 8])), bolt_r=u(0.28, 0.45),
                 bolt_size=u(0.035, 0.07), rim=bool(r.random() < 0.5), windows=int(_pick(r, [0, 0, 4, 5, 6, 8])),
                 springs=0, grooves=int(r.integers(0, 4)), colour=_pick(r, METALS + DARKS[:2]))
    elif kind == "rotor":
        p.update(vents=int(r.integers(14, 34)), rows=int(r.integers(1, 3)), hat=u(0.34, 0.48),
                 bolts=int(_pick(r, [4, 5, 6])), hole=u(0.1, 0.16), colour=_pick(r, METALS[:4]),
                 hat_colour=_pick(r, DARKS + METALS[3:4]))
    elif kind == "gear":
        p.update(teeth=int(r.integers(12, 36)), depth=u(0.08, 0.15), hole=u(0.1, 0.22),
                 holes=int(_pick(r, [0, 4, 5, 6])), pointy=bool(r.random() < 0.3), keyway=bool(r.random() < 0.5),
                 colour=_pick(r, METALS))
    elif kind == "ring":
        p.update(inner=u(0.5, 0.75), balls=int(_pick(r, [0, 0, 8, 10, 12])), lip=bool(r.random() < 0.4),
                 colour=_pick(r, METALS + DARKS[:1]), lip_colour=_pick(r, DARKS))
    elif kind == "cylinder":
        p.update(w=u(0.35, 0.75), h=u(0.65, 0.95), grooves=int(r.integers(0, 7)), ellipse=u(0.12, 0.28),
                 colour=_pick(r, METALS + PLASTICS[2:5]), cap=_pick(r, METALS + DARKS), band=bool(r.random() < 0.5))
    elif kind == "lens":
        p.update(rect=bool(r.random() < 0.5), w=u(0.75, 1.0), h=u(0.45, 0.8), ribs=int(r.integers(0, 9)),
                 frame=u(0.03, 0.08), tint=_pick(r, [(225, 230, 238), (200, 40, 40), (240, 170, 50), (180, 200, 225)]),
                 frame_colour=_pick(r, DARKS + METALS[5:]))
    elif kind == "spring":
        p.update(coils=int(r.integers(4, 10)), length=u(0.8, 1.0), radius=u(0.25, 0.42), wire=u(0.035, 0.07),
                 colour=_pick(r, METALS + [(40, 90, 170), (180, 40, 40), (220, 190, 40)]))
    elif kind == "rod":
        ends = ["ball", "eye", "spline", "disc", "plain"]
        p.update(length=u(0.85, 1.0), thick=u(0.05, 0.12), ends=(_pick(r, ends), _pick(r, ends)),
                 boots=int(r.integers(0, 2)), colour=_pick(r, METALS + DARKS[:2]), boot_colour=_pick(r, DARKS))
    elif kind == "hex":
        p.update(size=u(0.5, 0.85), shaft=bool(r.random() < 0.5), hole=u(0.35, 0.55), threads=int(r.integers(6, 14)),
                 colour=_pick(r, METALS))
    elif kind == "bracket":
        p.update(style=int(r.integers(0, 3)), holes=int(r.integers(1, 6)), slot=bool(r.random() < 0.5),
                 colour=_pick(r, METALS + DARKS + [(40, 40, 40), (60, 70, 110)]))
    elif kind == "box":
        p.update(w=u(0.5, 0.9), h=u(0.4, 0.8), pins=int(r.integers(0, 6)), label=bool(r.random() < 0.6),
                 connector=bool(r.random() < 0.4), colour=_pick(r, PLASTICS), radius=u(0.02, 0.12))
    elif kind == "blade":
        p.update(blades=int(r.integers(3, 12)), hub=u(0.12, 0.24), width=u(0.18, 0.4), sweep=u(-0.6, 0.6),
                 shroud=bool(r.random() < 0.3), colour=_pick(r, PLASTICS[:2] + METALS[:3] + [(60, 60, 66)]))
    elif kind == "hose":
        p.update(shape=int(r.integers(0, 3)), thick=u(0.1, 0.17), clamps=bool(r.random() < 0.7),
                 colour=_pick(r, DARKS[:3]), clamp_colour=_pick(r, METALS))
    elif kind == "belt":
        p.update(w=u(0.8, 1.0), h=u(0.35, 0.6), width=u(0.06, 0.11), teeth=int(_pick(r, [0, 40, 60, 80])),
                 colour=_pick(r, DARKS[:3]))
    elif kind == "bulb":
        p.update(glass=u(0.4, 0.55), base=u(0.3, 0.45), colour=_pick(r, [(240, 240, 225), (245, 225, 160),
                                                                       (230, 235, 245)]),
                 base_colour=_pick(r, METALS))
    elif kind == "grille":
        p.update(w=u(0.9, 1.0), h=u(0.45, 0.7), slats=int(r.integers(4, 10)), mesh=bool(r.random() < 0.4),
                 badge=bool(r.random() < 0.6), colour=_pick(r, DARKS[:3] + METALS[5:]))
    elif kind == "star":
        p.update(points=int(r.integers(3, 9)), inner=u(0.35, 0.6), ring=bool(r.random() < 0.6),
                 colour=_pick(r, METALS[5:] + METALS[:1] + [(200, 170, 80)]))
    elif kind == "pad":
        p.update(span=u(1.0, 1.7), thick=u(0.3, 0.45), pistons=int(r.integers(0, 3)),
                 colour=_pick(r, DARKS), backing=_pick(r, METALS[:4] + [(40, 40, 40), (180, 40, 40)]))
    elif kind == "panel":
        p.update(w=u(0.8, 1.0), h=u(0.3, 0.55), radius=u(0.1, 0.5), seams=bool(r.random() < 0.6),
                 mirror=bool(r.random() < 0.4), colour=_pick(r, FABRICS + PLASTICS[:2]))
    elif kind == "arm":
        p.update(spread=u(0.6, 1.0), thick=u(0.08, 0.14), eye=u(0.09, 0.14), colour=_pick(r, DARKS + METALS[:3]))
    elif kind == "strap":
        p.update(loop=bool(r.random() < 0.6), width=u(0.05, 0.09), ribs=int(r.integers(10, 30)),
                 colour=_pick(r, [(30, 30, 30), (235, 232, 222), (40, 40, 40)]))
    elif kind == "plug":
        p.update(insulator=u(0.3, 0.45), hex_h=u(0.12, 0.2), thread=u(0.2, 0.35), width=u(0.18, 0.3),
                 ribs=int(r.integers(0, 6)), ceramic=_pick(r, [(236, 233, 225), (40, 40, 40), (60, 90, 150)]),
                 colour=_pick(r, METALS))
    elif kind == "horn":
        p.update(radius=u(0.6, 0.9), grooves=int(r.integers(2, 7)), tab=bool(r.random() < 0.7),
                 colour=_pick(r, [(30, 30, 30), (180, 40, 40), (40, 40, 44), (150, 150, 156)]))
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    p.update(_OVERRIDES.get(name, {}))
    return p


def _draw_disc(d, c, R, p, col, rng):
    base = _solid(col)
    _circle(d, c, c, R, fill=base)
    if p["windows"]:
        step = 2 * math.pi / p["windows"]
        for k in range(p["windows"]):
            a0 = math.degrees(k * step + step * 0.2)
            a1 = math.degrees((k + 1) * step - step * 0.2)
            d.pieslice([c - 0.84 * R, c - 0.84 * R, c + 0.84 * R, c + 0.84 * R], a0, a1, fill=CLEAR)
        _circle(d, c, c, 0.5 * R, fill=base)
    if p["rim"]:
        _circle(d, c, c, 0.93 * R, outline=_shade(col, 0.7), width=max(2, int(0.06 * R)))
    for k in range(p["grooves"]):
        _circle(d, c, c, R * (0.6 + 0.1 * k), outline=_shade(col, 0.85), width=max(1, int(0.015 * R)))
    for k in range(p.get("springs", 0)):
        x, y = _polar(c, 0.45 * R, 2 * math.pi * k / p["springs"])
        d.rectangle([x - 0.06 * R, y - 0.1 * R, x + 0.06 * R, y + 0.1 * R], fill=_shade(col, 0.55))
    for k in range(p["bolts"]):
        x, y = _polar(c, p["bolt_r"] * R, 2 * math.pi * k / p["bolts"] + 0.3)
        _circle(d, x, y, p["bolt_size"] * R, fill=CLEAR)
    _circle(d, c, c, p["hole"] * R, fill=CLEAR)


def _draw_rotor(d, c, R, p, col, rng):
    _circle(d, c, c, R, fill=_solid(col))
    for k in range(4):
        _circle(d, c, c, R * (0.62 + 0.09 * k), outline=_shade(col, 0.9 + 0.04 * k), width=max(1, int(0.012 * R)))
    rows = [0.78] if p["rows"] == 1 else [0.7, 0.86]
    for j, rr in enumerate(rows):
        for k in range(p["vents"]):
            x, y = _polar(c, rr * R, 2 * math.pi * (k + 0.5 * j) / p["vents"])
            _circle(d, x, y, 0.035 * R, fill=_shade(col, 0.3))
    _circle(d, c, c, p["hat"] * R, fill=_solid(p["hat_colour"]))
    _circle(d, c, c, p["hat"] * R, outline=_shade(p["hat_colour"], 1.4), width=max(1, int(0.02 * R)))
    for k in range(p["bolts"]):
        x, y = _polar(c, 0.62 * p["hat"] * R, 2 * math.pi * k / p["bolts"])
        _circle(d, x, y, 0.05 * R, fill=CLEAR)
    _circle(d, c, c, p["hole"] * R, fill=CLEAR)


def _draw_gear(d, c, R, p, col, rng):
    n, depth = p["teeth"], p["depth"]
    pts = []
    for k in range(n):
        a = 2 * math.pi * k / n
        w = math.pi / n
        if p["pointy"]:
            pts += [_polar(c, (1 - depth) * R, a - w), _polar(c, R, a), _polar(c, (1 - depth) * R, a + w * 0.2)]
        else:
            pts += [_polar(c, (1 - depth) * R, a - w * 0.5), _polar(c, R, a - w * 0.3),
                    _polar(c, R, a + w * 0.3), _polar(c, (1 - depth) * R, a + w * 0.5)]
    d.polygon(pts, fill=_solid(col))
    _circle(d, c, c, (1 - depth) * R * 0.82, outline=_shade(col, 0.8), width=max(1, int(0.02 * R)))
    for k in range(p["holes"]):
        x, y = _polar(c, 0.52 * R, 2 * math.pi * k / p["holes"])
        _circle(d, x, y, 0.11 * R, fill=CLEAR)
    _circle(d, c, c, p["hole"] * R, fill=CLEAR)
    if p["keyway"]:
        h = p["hole"] * R
        d.rectangle([c - 0.25 * h, c - h * 1.3, c + 0.25 * h, c], fill=CLEAR)


def _draw_ring(d, c, R, p, col, rng):
    inner = p["inner"]
    _circle(d, c, c, R, fill=_solid(col))
    if p["balls"]:
        mid = (1 + inner) / 2
        _circle(d, c, c, mid * R + 0.09 * R, fill=_shade(col, 0.6))
        _circle(d, c, c, mid * R - 0.09 * R, fill=_solid(col))
        for k in range(p["balls"]):
            x, y = _polar(c, mid * R, 2 * math.pi * k / p["balls"])
            _circle(d, x, y, 0.075 * R, fill=_shade(col, 1.25))
    if p["lip"]:
        _circle(d, c, c, (inner + 0.12) * R, fill=_solid(p["lip_colour"]))
    _circle(d, c, c, 0.97 * R, outline=_shade(col, 0.75), width=max(1, int(0.02 * R)))
    _circle(d, c, c, inner * R, fill=CLEAR)


def _draw_cylinder(d, c, R, p, col, rng):
    w, h, e = p["w"] * R, p["h"] * R, p["ellipse"] * p["w"] * R
    d.rectangle([c - w, c - h + e, c + w, c + h - e], fill=_solid(col))
    d.ellipse([c - w, c + h - 2 * e, c + w, c + h], fill=_solid(col))
    # cylindrical shading: darker bands towards both edges
    for k in range(1, 5):
        f = 1 - 0.07 * k
        d.line([(c - w + k * w / 14, c - h + e), (c - w + k * w / 14, c + h - e)], fill=_shade(col, f),
               width=max(1, int(w / 14)))
        d.line([(c + w - k * w / 14, c - h + e), (c + w - k * w / 14, c + h - e)], fill=_shade(col, f),
               width=max(1, int(w / 14)))
    d.line([(c - 0.35 * w, c - h + e), (c - 0.35 * w, c + h - e)], fill=_shade(col, 1.3), width=max(1, int(w / 10)))
    for k in range(p["grooves"]):
        y = c - h + e + (k + 1) * (0.45 * h) / (p["grooves"] + 1) + 0.1 * h
        d.line([(c - w, y), (c + w, y)], fill=_shade(col, 0.55), width=max(1, int(0.025 * R)))
    if p["band"]:
        d.rectangle([c - w, c + 0.35 * h, c + w, c + 0.55 * h], fill=_shade(p["cap"], 0.9))
    d.ellipse([c - w, c - h, c + w, c - h + 2 * e], fill=_solid(p["cap"]),
              outline=_shade(p["cap"], 0.6), width=max(1, int(0.02 * R)))
    d.ellipse([c - 0.35 * w, c - h + 0.65 * e, c + 0.35 * w, c - h + 1.35 * e], fill=_shade(p["cap"], 0.6))


def _draw_lens(d, c, R, p, col, rng, layer):
    w, h = p["w"] * R, p["h"] * R
    box = [c - w, c - h, c + w, c + h]
    fw = max(2, int(p["frame"] * R))
    mask = Image.new("L", layer.size, 0)
    md = ImageDraw.Draw(mask)
    if p["rect"]:
        md.rounded_rectangle(box, radius=0.3 * h, fill=255)
    else:
        md.ellipse(box, fill=255)
    size = layer.size[0]
    yy = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
    xx = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :]
    t = np.clip(0.55 * yy + 0.45 * xx, 0, 1)[..., None]
    tint = np.array(p["tint"], dtype=np.float32)
    grad = tint * (0.75 + 0.45 * (1 - t))
    grad = np.clip(grad + 50 * np.exp(-((xx - 0.35) ** 2 + (yy - 0.3) ** 2) / 0.01)[..., None], 0, 255)
    rgba = np.dstack([grad.astype(np.uint8), np.full((size, size), 255, np.uint8)])
    layer.paste(Image.fromarray(rgba, "RGBA"), (0, 0), mask)
    for k in range(p["ribs"]):
        x = c - w + (k + 1) * 2 * w / (p["ribs"] + 1)
        d.line([(x, c - 0.8 * h), (x, c + 0.8 * h)], fill=_shade(p["tint"], 1.15), width=max(1, int(0.015 * R)))
    if p["rect"]:
        d.rounded_rectangle(box, radius=0.3 * h, outline=_solid(p["frame_colour"]), width=fw)
    else:
        d.ellipse(box, outline=_solid(p["frame_colour"]), width=fw)


def _draw_spring(d, c, R, p, col, rng):
    L, r, n = p["length"] * R, p["radius"] * R, p["coils"]
    wire = max(2, int(p["wire"] * R))
    x0 = c - L
    step = 2 * L / n
    for k in range(n):  # back half of each coil, darker
        xa = x0 + k * step
        d.line([(xa + step / 2, c - r), (xa + step, c + r)], fill=_shade(col, 0.6), width=wire)
    for k in range(n):  # front half
        xa = x0 + k * step
        d.line([(xa, c + r), (xa + step / 2, c - r)], fill=_solid(col), width=wire, joint="curve")
    d.line([(x0, c + r), (x0 + 0.3 * step, c + r)], fill=_solid(col), width=wire)


def _rod_end(d, x, y, kind, R, t, col, left):
    s = -1 if left else 1
    if kind == "ball":
        _circle(d, x, y, 1.6 * t, fill=_shade(col, 1.1))
        _circle(d, x, y, 0.8 * t, fill=_shade(col, 0.7))
    elif kind == "eye":
        _circle(d, x + s * t, y, 1.8 * t, fill=_solid(col))
        _circle(d, x + s * t, y, 0.9 * t, fill=CLEAR)
    elif kind == "spline":
        d.rectangle([min(x, x + s * 3 * t), y - 1.3 * t, max(x, x + s * 3 * t), y + 1.3 * t], fill=_shade(col, 0.9))
        for k in range(6):
            xx = x + s * (k + 0.5) * 0.5 * t
            d.line([(xx, y - 1.3 * t), (xx, y + 1.3 * t)], fill=_shade(col, 0.6), width=max(1, int(0.15 * t)))
    elif kind == "disc":
        d.polygon([(x, y - 0.6 * t), (x + s * 1.2 * t, y - 3 * t), (x + s * 1.6 * t, y - 3 * t),
                   (x + s * 1.6 * t, y + 3 * t), (x + s * 1.2 * t, y + 3 * t), (x, y + 0.6 * t)], fill=_solid(col))
    elif kind == "blade":
        d.rectangle([min(x, x + s * 0.6 * R), y + 0.8 * t, max(x, x + s * 0.6 * R), y + 1.6 * t], fill=_shade(col, 0.5))


def _draw_rod(d, c, R, p, col, rng):
    L, t = p["length"] * R, p["thick"] * R
    d.rectangle([c - L + t, c - t / 2, c + L - t, c + t / 2], fill=_solid(col))
    d.line([(c - L + t, c - t / 4), (c + L - t, c - t / 4)], fill=_shade(col, 1.3), width=max(1, int(t / 5)))
    _rod_end(d, c - L + t, c, p["ends"][0], R, t, col, left=True)
    _rod_end(d, c + L - t, c, p["ends"][1], R, t, col, left=False)
    for k in range(p["boots"]):
        xb = c - 0.6 * L if k == 0 else c + 0.6 * L
        for j in range(4):
            _circle(d, xb + (j - 1.5) * 0.5 * t, c, (1.6 - 0.2 * abs(j - 1.5)) * t, fill=_shade(p["boot_colour"],
                                                                                                1 + 0.1 * (j % 2)))


def _hexagon(c, cy, r, rot=0.0):
    return [(c + r * math.cos(rot + k * math.pi / 3), cy + r * math.sin(rot + k * math.pi / 3)) for k in range(6)]


def _draw_hex(d, c, R, p, col, rng):
    s = p["size"] * R
    if p["shaft"]:  # bolt, side view: hex head on the left, threaded shaft to the right
        hw = 0.35 * s
        d.rectangle([c - s, c - 0.55 * s, c - s + hw, c + 0.55 * s], fill=_shade(col, 1.05))
        d.line([(c - s, c), (c - s + hw, c)], fill=_shade(col, 0.7), width=max(1, int(0.03 * R)))
        t = 0.28 * s
        d.rectangle([c - s + hw, c - t, c + s, c + t], fill=_solid(col))
        for k in range(p["threads"]):
            x = c - s + hw + 0.35 * s + k * (1.65 * s - 0.35 * s) / p["threads"]
            d.line([(x, c - t), (x + 0.05 * s, c + t)], fill=_shade(col, 0.6), width=max(1, int(0.02 * R)))
    else:  # nut, top view
        d.polygon(_hexagon(c, c, s), fill=_solid(col))
        d.polygon(_hexagon(c, c, 0.92 * s), outline=_shade(col, 1.25))
        _circle(d, c, c, 0.85 * s, outline=_shade(col, 0.8), width=max(1, int(0.02 * R)))
        _circle(d, c, c, p["hole"] * s * 1.15, fill=_shade(col, 0.55))
        _circle(d, c, c, p["hole"] * s, fill=CLEAR)


def _draw_bracket(d, c, R, p, col, rng):
    t = 0.32 * R
    if p["style"] == 0:  # L-shape
        pts = [(c - R, c - R * 0.8), (c - R + t, c - R * 0.8), (c - R + t, c + R * 0.8 - t), (c + R, c + R * 0.8 - t),
               (c + R, c + R * 0.8), (c - R, c + R * 0.8)]
        holes = [(c - R + t / 2, c - R * 0.8 + (k + 0.7) * 1.2 * R / max(1, p["holes"])) for k in range(p["holes"])]
    elif p["style"] == 1:  # flat plate with a tab
        pts = [(c - R, c - 0.4 * R), (c + 0.3 * R, c - 0.4 * R), (c + R, c - 0.1 * R), (c + R, c + 0.3 * R),
               (c - R, c + 0.4 * R)]
        holes = [(c - 0.8 * R + k * 1.6 * R / max(1, p["holes"]), c) for k in range(p["holes"])]
    else:  # triangular gusset
        pts = [(c - R, c + 0.7 * R), (c + R, c + 0.7 * R), (c - R, c - 0.8 * R)]
        holes = [(c - 0.7 * R + k * 0.5 * R, c + 0.5 * R - k * 0.1 * R) for k in range(min(p["holes"], 3))]
    d.polygon(pts, fill=_solid(col), outline=_shade(col, 0.6))
    for x, y in holes:
        _circle(d, x, y, 0.07 * R, fill=CLEAR)
    if p["slot"]:
        d.rounded_rectangle([c - 0.1 * R, c - 0.05 * R + (0.45 * R if p["style"] == 0 else 0),
                             c + 0.35 * R, c + 0.07 * R + (0.45 * R if p["style"] == 0 else 0)],
                            radius=0.05 * R, fill=CLEAR)


def _draw_box(d, c, R, p, col, rng):
    w, h = p["w"] * R, p["h"] * R
    for k in range(p["pins"]):
        x = c - 0.7 * w + k * 1.4 * w / max(1, p["pins"] - 1) if p["pins"] > 1 else c
        d.rectangle([x - 0.04 * R, c + h - 0.05 * R, x + 0.04 * R, c + h + 0.25 * R], fill=_solid(METALS[4]))
    d.rounded_rectangle([c - w, c - h, c + w, c + h], radius=p["radius"] * R, fill=_solid(col),
                        outline=_shade(col, 0.6), width=max(1, int(0.02 * R)))
    d.rectangle([c - w, c - h, c + w, c - h + 0.1 * h], fill=_shade(col, 1.2))
    if p["label"]:
        d.rectangle([c - 0.6 * w, c - 0.3 * h, c + 0.6 * w, c + 0.3 * h], fill=(235, 235, 228, 255))
        for k in range(3):
            y = c - 0.15 * h + k * 0.15 * h
            d.line([(c - 0.5 * w, y), (c + (0.3 - 0.2 * k) * w, y)], fill=(60, 60, 60, 255), width=max(1, int(0.02 * R)))
    if p["connector"]:
        d.rectangle([c + w, c - 0.3 * h, c + w + 0.2 * R, c + 0.3 * h], fill=_shade(col, 0.8))


def _draw_blade(d, c, R, p, col, rng):
    n = p["blades"]
    for k in range(n):
        a = 2 * math.pi * k / n
        wdt = p["width"] * math.pi / max(3, n) * 2
        pts = [_polar(c, p["hub"] * R, a - wdt * 0.3), _polar(c, 0.95 * R, a - wdt * 0.5 + p["sweep"] * 0.5),
               _polar(c, 0.98 * R, a + wdt * 0.5 + p["sweep"] * 0.5), _polar(c, p["hub"] * R, a + wdt * 0.3)]
        d.polygon(pts, fill=_shade(col, 0.9 + 0.2 * (k % 2)), outline=_shade(col, 0.6))
    if p["shroud"]:
        _circle(d, c, c, 0.98 * R, outline=_solid(col), width=max(2, int(0.06 * R)))
    _circle(d, c, c, p["hub"] * R, fill=_shade(col, 0.75))
    _circle(d, c, c, 0.35 * p["hub"] * R, fill=CLEAR)


def _draw_hose(d, c, R, p, col, rng):
    if p["shape"] == 0:
        ctrl = [(-0.9, 0.6), (-0.4, -0.9), (0.4, 0.9), (0.9, -0.6)]
    elif p["shape"] == 1:
        ctrl = [(-0.8, -0.8), (-0.8, 0.9), (0.8, 0.9), (0.8, -0.8)]
    else:
        ctrl = [(-0.9, -0.7), (-0.2, -0.7), (0.3, 0.2), (0.9, 0.8)]
    pts = []
    for i in range(41):
        t = i / 40
        b = [(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t * t * (1 - t), t ** 3]
        pts.append((c + R * sum(bi * q[0] for bi, q in zip(b, ctrl)), c + R * sum(bi * q[1] for bi, q in zip(b, ctrl))))
    w = int(p["thick"] * R * 2)
    d.line(pts, fill=_solid(col), width=w, joint="curve")
    d.line(pts, fill=_shade(col, 1.6), width=max(1, w // 6), joint="curve")
    if p["clamps"]:
        for idx in (3, 37):
            (x0, y0), (x1, y1) = pts[idx - 1], pts[idx + 1]
            ang = math.atan2(y1 - y0, x1 - x0) + math.pi / 2
            x, y = pts[idx]
            dx, dy = math.cos(ang) * w * 0.6, math.sin(ang) * w * 0.6
            d.line([(x - dx, y - dy), (x + dx, y + dy)], fill=_solid(p["clamp_colour"]), width=max(2, w // 4))


def _draw_belt(d, c, R, p, col, rng):
    w, h, bw = p["w"] * R, p["h"] * R, max(2, int(p["width"] * R))
    d.rounded_rectangle([c - w, c - h, c + w, c + h], radius=h * 0.95, outline=_solid(col), width=bw)
    if p["teeth"]:
        d.rounded_rectangle([c - w + bw, c - h + bw, c + w - bw, c + h - bw], radius=max(1, h * 0.95 - bw),
                            outline=_shade(col, 0.5), width=max(1, bw // 3))
    d.rounded_rectangle([c - w + bw * 0.3, c - h + bw * 0.3, c + w - bw * 0.3, c + h - bw * 0.3],
                        radius=h * 0.95, outline=_shade(col, 1.5), width=max(1, bw // 5))


def _draw_bulb(d, c, R, p, col, rng):
    g, b = p["glass"] * R, p["base"] * R
    cy = c - 0.3 * R
    d.rectangle([c - 0.45 * g, cy + 0.6 * g, c + 0.45 * g, cy + g + b], fill=_solid(p["base_colour"]))
    for k in range(4):
        y = cy + g + k * b / 4
        d.line([(c - 0.45 * g, y), (c + 0.45 * g, y + 0.08 * b)], fill=_shade(p["base_colour"], 0.6),
               width=max(1, int(0.02 * R)))
    _circle(d, c, cy + g + b + 0.06 * R, 0.08 * R, fill=_shade(p["base_colour"], 0.5))
    _circle(d, c, cy, g, fill=_solid(col), outline=_shade(col, 0.85), width=max(1, int(0.02 * R)))
    d.line([(c - 0.2 * g, cy + 0.6 * g), (c - 0.1 * g, cy), (c + 0.1 * g, cy), (c + 0.2 * g, cy + 0.6 * g)],
           fill=(90, 80, 70, 255), width=max(1, int(0.015 * R)))
    _circle(d, c - 0.4 * g, cy - 0.4 * g, 0.15 * g, fill=(255, 255, 255, 255))


def _draw_grille(d, c, R, p, col, rng):
    w, h = p["w"] * R, p["h"] * R
    d.rounded_rectangle([c - w, c - h, c + w, c + h], radius=0.25 * h, fill=_solid(col))
    inner = [c - 0.9 * w, c - 0.8 * h, c + 0.9 * w, c + 0.8 * h]
    d.rounded_rectangle(inner, radius=0.2 * h, fill=_shade(col, 0.35))
    if p["mesh"]:
        for i in range(12):
            for j in range(5):
                x = inner[0] + (i + 0.5) * (inner[2] - inner[0]) / 12
                y = inner[1] + (j + 0.5) * (inner[3] - inner[1]) / 5
                d.polygon(_hexagon(x, y, 0.055 * R), fill=_shade(col, 0.9))
    else:
        for k in range(p["slats"]):
            y = inner[1] + (k + 0.5) * (inner[3] - inner[1]) / p["slats"]
            d.line([(inner[0], y), (inner[2], y)], fill=_shade(col, 1.15), width=max(1, int(0.6 * h / p["slats"])))
    if p["badge"]:
        _circle(d, c, c, 0.18 * R, fill=_solid(METALS[5]), outline=_shade(METALS[5], 0.6), width=2)


def _draw_star(d, c, R, p, col, rng):
    n = p["points"]
    pts = []
    for k in range(2 * n):
        r = R * (0.85 if k % 2 == 0 else 0.85 * p["inner"])
        pts.append(_polar(c, r, -math.pi / 2 + k * math.pi / n))
    if p["ring"]:
        _circle(d, c, c, R, outline=_solid(col), width=max(2, int(0.08 * R)))
    d.polygon(pts, fill=_solid(col), outline=_shade(col, 0.6))
    d.polygon([(x * 0.5 + c * 0.5, y * 0.5 + c * 0.5) for x, y in pts], fill=_shade(col, 1.2))


def _draw_pad(d, c, R, p, col, rng):
    span, t = p["span"], p["thick"]
    cy = c + 0.9 * R
    a0, a1 = -math.pi / 2 - span / 2, -math.pi / 2 + span / 2
    outer = [_polar(0, 1.6 * R, a0 + (a1 - a0) * i / 20) for i in range(21)]
    inner = [_polar(0, (1.6 - t * 1.6) * R, a1 - (a1 - a0) * i / 20) for i in range(21)]
    pts = [(c + x, cy + y) for x, y in outer + inner]
    back = [(c + x * 1.05, cy + y * 1.02 - 0.04 * R) for x, y in outer] + [(c + x * 1.05, cy + y) for x, y in inner]
    d.polygon(back, fill=_solid(p["backing"]))
    d.polygon(pts, fill=_solid(col))
    d.line([(c, cy - 1.6 * R), (c, cy - (1.6 - t * 1.6) * R)], fill=_shade(col, 0.5), width=max(1, int(0.03 * R)))
    for k in range(p["pistons"]):
        x = c + (k - (p["pistons"] - 1) / 2) * 0.6 * R
        _circle(d, x, cy - 1.35 * R, 0.22 * R, fill=_solid(METALS[5]), outline=_shade(METALS[5], 0.6), width=2)


def _draw_panel(d, c, R, p, col, rng):
    w, h = p["w"] * R, p["h"] * R
    d.rounded_rectangle([c - w, c - h, c + w, c + h], radius=p["radius"] * h * 2 * 0.5, fill=_solid(col))
    if p["seams"]:
        d.rounded_rectangle([c - 0.9 * w, c - 0.75 * h, c + 0.9 * w, c + 0.75 * h], radius=p["radius"] * h * 0.8,
                            outline=_shade(col, 0.7), width=max(1, int(0.015 * R)))
    if p["mirror"]:
        d.rectangle([c - 0.4 * w, c - 0.5 * h, c + 0.25 * w, c + 0.5 * h], fill=(200, 210, 220, 255),
                    outline=_shade(col, 0.5), width=2)
    d.line([(c - 0.95 * w, c - 0.8 * h), (c + 0.95 * w, c - 0.8 * h)], fill=_shade(col, 1.2), width=max(1, int(0.03 * R)))


def _draw_arm(d, c, R, p, col, rng):
    s, t, e = p["spread"], max(2, int(p["thick"] * R * 2)), p["eye"] * R
    a, b, q = (c - R * 0.9, c - s * R * 0.7), (c - R * 0.9, c + s * R * 0.7), (c + R * 0.85, c)
    d.line([a, q, b], fill=_solid(col), width=t, joint="curve")
    d.line([a, (c - 0.3 * R, c), b], fill=_shade(col, 0.9), width=max(2, t // 2), joint="curve")
    for x, y in (a, b):
        _circle(d, x, y, 1.6 * e, fill=_shade(col, 0.8))
        _circle(d, x, y, 0.9 * e, fill=_solid(DARKS[0]))
        _circle(d, x, y, 0.35 * e, fill=CLEAR)
    _circle(d, q[0], q[1], 1.4 * e, fill=_shade(col, 1.2))
    _circle(d, q[0], q[1], 0.6 * e, fill=_shade(col, 0.5))


def _draw_strap(d, c, R, p, col, rng):
    w = max(2, int(p["width"] * R))
    if p["loop"]:
        d.arc([c - 0.8 * R, c - 0.8 * R, c + 0.8 * R, c + 0.8 * R], 20, 340, fill=_solid(col), width=w)
        hx, hy = _polar(c, 0.8 * R, math.radians(10))
    else:
        d.line([(c - R, c), (c + 0.75 * R, c)], fill=_solid(col), width=w)
        for k in range(p["ribs"]):
            x = c - 0.9 * R + k * 1.6 * R / p["ribs"]
            d.line([(x, c - w / 2), (x, c + w / 2)], fill=_shade(col, 0.8), width=1)
        hx, hy = c + 0.8 * R, c
    d.rectangle([hx - 0.12 * R, hy - 0.12 * R, hx + 0.12 * R, hy + 0.12 * R], fill=_shade(col, 0.9),
                outline=_shade(col, 0.6))
    d.rectangle([hx - 0.05 * R, hy - 0.03 * R, hx + 0.05 * R, hy + 0.03 * R], fill=CLEAR)


def _draw_plug(d, c, R, p, col, rng):
    wd = p["width"] * R
    y = c - R
    d.rectangle([c - 0.3 * wd, y, c + 0.3 * wd, y + 0.12 * R], fill=_solid(METALS[5]))  # terminal
    y += 0.12 * R
    ins = p["insulator"] * 2 * R
    d.rectangle([c - 0.55 * wd, y, c + 0.55 * wd, y + ins], fill=_solid(p["ceramic"]))
    for k in range(p["ribs"]):
        yy = y + (k + 0.5) * ins / max(1, p["ribs"]) * 0.6
        d.line([(c - 0.6 * wd, yy), (c + 0.6 * wd, yy)], fill=_shade(p["ceramic"], 0.8), width=max(1, int(0.02 * R)))
    y += ins
    hh = p["hex_h"] * 2 * R
    d.rectangle([c - wd, y, c + wd, y + hh], fill=_solid(col), outline=_shade(col, 0.6))
    d.line([(c - 0.35 * wd, y), (c - 0.35 * wd, y + hh)], fill=_shade(col, 0.7), width=max(1, int(0.02 * R)))
    d.line([(c + 0.35 * wd, y), (c + 0.35 * wd, y + hh)], fill=_shade(col, 0.7), width=max(1, int(0.02 * R)))
    y += hh
    th = min(p["thread"] * 2 * R, c + R - y - 0.08 * R)
    d.rectangle([c - 0.6 * wd, y, c + 0.6 * wd, y + th], fill=_shade(col, 0.95))
    for k in range(8):
        yy = y + (k + 0.5) * th / 8
        d.line([(c - 0.6 * wd, yy), (c + 0.6 * wd, yy + 0.03 * R)], fill=_shade(col, 0.6), width=1)
    y += th
    d.line([(c, y), (c, y + 0.06 * R), (c + 0.15 * wd, y + 0.06 * R)], fill=_shade(col, 0.5), width=max(1, int(0.02 * R)))


def _draw_horn(d, c, R, p, col, rng):
    r = p["radius"] * R
    if p["tab"]:
        d.rectangle([c - 0.1 * R, c - r - 0.3 * R, c + 0.1 * R, c - r + 0.1 * R], fill=_solid(METALS[0]))
        _circle(d, c, c - r - 0.18 * R, 0.05 * R, fill=CLEAR)
    _circle(d, c, c, r, fill=_solid(col))
    for k in range(p["grooves"]):
        _circle(d, c, c, r * (0.3 + 0.65 * (k + 1) / (p["grooves"] + 1)), outline=_shade(col, 0.6 if k % 2 else 1.35),
                width=max(1, int(0.025 * R)))
    _circle(d, c, c, 0.18 * r, fill=_shade(col, 0.5))


_DRAWERS: dict[str, Callable] = {
    "disc": _draw_disc, "rotor": _draw_rotor, "gear": _draw_gear, "ring": _draw_ring, "cylinder": _draw_cylinder,
    "spring": _draw_spring, "rod": _draw_rod, "hex": _draw_hex, "bracket": _draw_bracket, "box": _draw_box,
    "blade": _draw_blade, "hose": _draw_hose, "belt": _draw_belt, "bulb": _draw_bulb, "grille": _draw_grille,
    "star": _draw_star, "pad": _draw_pad, "panel": _draw_panel, "arm": _draw_arm, "strap": _draw_strap,
    "plug": _draw_plug, "horn": _draw_horn,
}
SHAPE_KINDS = sorted([*_DRAWERS, "lens"])


# --------------------------------------------------------------------------------------------------------------
# one photo
# --------------------------------------------------------------------------------------------------------------
def _render_object(params: dict, rng: np.random.Generator, size: int) -> Image.Image:
    """Draw the category's shape on a transparent, supersampled square layer, with a lighting gradient."""
    L = 2 * size
    layer = Image.new("RGBA", (L, L), CLEAR)
    d = ImageDraw.Draw(layer)
    c, R = L / 2, 0.45 * L
    colour = _jitter_colour(rng, params.get("colour", (128, 128, 128)), 6)
    kind = params["kind"]
    if kind == "lens":
        _draw_lens(d, c, R, params, colour, rng, layer)
    else:
        _DRAWERS[kind](d, c, R, params, colour, rng)
    arr = np.asarray(layer, dtype=np.float32).copy()
    theta = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(0.15, 0.4)
    coords = (np.arange(L, dtype=np.float32) - c) / L * 2
    grad = 1 + strength * (coords[None, :] * math.cos(theta) + coords[:, None] * math.sin(theta))
    grad *= rng.uniform(0.9, 1.1)
    arr[..., :3] = np.clip(arr[..., :3] * grad[..., None], 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "RGBA")


def _render_photo(params: dict, rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image]:
    """Return (RGB photo on an off-white background, object alpha mask of the same size)."""
    ax, ay = _CANVAS_ASPECTS[int(rng.integers(len(_CANVAS_ASPECTS)))]
    W, H = max(16, round(size * ax)), max(16, round(size * ay))
    obj = _render_object(params, rng, size)
    if params["kind"] in _ROUND_KINDS:
        angle = float(rng.uniform(0, 360))
    else:
        angle = float(rng.uniform(-25, 25))
        if rng.random() < 0.5:
            obj = obj.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    obj = obj.convert("RGBa").rotate(angle, resample=Image.Resampling.BICUBIC, expand=True).convert("RGBA")
    bbox = obj.getchannel("A").getbbox()
    if bbox:
        obj = obj.crop(bbox)
    stretch = float(rng.uniform(0.85, 1.15))
    ow, oh = obj.width * stretch, obj.height / stretch
    fill = float(rng.uniform(0.55, 0.85))
    k = min(W * fill / ow, H * fill / oh)
    tw, th = max(4, round(ow * k)), max(4, round(oh * k))
    obj = obj.convert("RGBa").resize((tw, th), Image.Resampling.LANCZOS).convert("RGBA")
    ox = int(round((W - tw) / 2 + rng.uniform(-0.08, 0.08) * W))
    oy = int(round((H - th) / 2 + rng.uniform(-0.08, 0.08) * H))
    ox, oy = int(np.clip(ox, 0, W - tw)), int(np.clip(oy, 0, H - th))

    alpha_img = Image.new("L", (W, H), 0)
    alpha_img.paste(obj.getchannel("A"), (ox, oy))
    rgb_obj = Image.new("RGB", (W, H), (0, 0, 0))
    rgb_obj.paste(obj.convert("RGB"), (ox, oy))

    base = int(rng.integers(235, 256))
    tint = rng.integers(-3, 4, size=3)
    yy = np.linspace(-1, 1, H, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, W, dtype=np.float32)[None, :]
    vignette = -rng.uniform(0, 8) * (xx ** 2 + yy ** 2) / 2 + rng.uniform(-4, 4) * yy
    bg = np.clip(base + tint[None, None, :] + vignette[..., None], 0, 255)
    shadow = np.asarray(alpha_img.filter(ImageFilter.GaussianBlur(rng.uniform(2, 5))), dtype=np.float32) / 255
    sx, sy = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    shadow = np.roll(np.roll(shadow, sy, axis=0), sx, axis=1)
    bg = bg * (1 - rng.uniform(0.12, 0.3) * shadow[..., None])
    a = np.asarray(alpha_img, dtype=np.float32)[..., None] / 255
    img = bg * (1 - a) + np.asarray(rgb_obj, dtype=np.float32) * a
    photo = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.5:
        photo = photo.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
    sigma = float(rng.uniform(0, 3))
    if sigma > 0.3:
        noisy = np.asarray(photo, dtype=np.float32) + rng.normal(0, sigma, size=(H, W, 3))
        photo = Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8), "RGB")
    return photo, alpha_img


def _encode(photo: Image.Image, alpha: Image.Image, fmt: str, rng: np.random.Generator) -> bytes:
    """Encode a photo in one of the catalogue's formats (deterministic: fixed settings, no timestamps)."""
    buf = io.BytesIO()
    if fmt in ("jpeg", "jpeg_truncated"):
        photo.save(buf, format="JPEG", quality=JPEG_QUALITY)
    elif fmt == "jpeg_cmyk":
        photo.convert("CMYK").save(buf, format="JPEG", quality=JPEG_QUALITY)
    elif fmt == "jpeg_exif_rotated":
        orientation = 6 if rng.random() < 0.5 else 8
        # exif_transpose applies ROTATE_270 for 6 and ROTATE_90 for 8: store the inverse rotation.
        stored = photo.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored.save(buf, format="JPEG", quality=JPEG_QUALITY, exif=exif.tobytes())
    elif fmt == "png_rgba":
        rgba = photo.copy()
        rgba.putalpha(alpha)
        rgba.save(buf, format="PNG")
    elif fmt == "png_palette":
        photo.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(buf, format="PNG")
    else:
        raise ValueError(f"unknown format {fmt!r}")
    data = buf.getvalue()
    if fmt == "jpeg_truncated":
        data = data[: len(data) // 2]
    return data


def _format_for(rng: np.random.Generator) -> str:
    x, acc = float(rng.random()), 0.0
    for fmt, share in FORMAT_SHARES:
        acc += share
        if x < acc:
            return fmt
    return "jpeg"


# --------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------
def catalogue_plan(scale: float = 1.0) -> dict[str, int]:
    """Photos per category at ``scale`` (each at least 1), in rendering order."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return {name: _count(n, scale) for name, _, n in DEMO_CATEGORIES}


def generate_demo_catalogue(out_dir: str | Path, seed: int = 0, size: int = 128, scale: float = 1.0) -> dict:
    """Render the demo catalogue into out_dir (one sub-folder per category); return a summary dict.

    Files are ``<out_dir>/<Category Name>/<nnn>.jpg|png``; existing files of the same name are overwritten,
    other files are left alone (use :func:`ensure_demo_catalogue` for a clean, atomic generation).

    The summary: ``categories`` and ``images`` (counts, the truncated file and both duplicate copies
    included), ``formats`` (files per format: jpeg, jpeg_cmyk, jpeg_exif_rotated, png_rgba, png_palette,
    jpeg_truncated), ``per_category`` (files per category), ``duplicate`` (the two paths with identical bytes)
    and ``truncated`` (the path of the cut JPEG). Paths are relative to ``out_dir``, POSIX style, e.g.
    ``"Brake Rotor/000.jpg"``, the same keys the folder image source uses.
    """
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = catalogue_plan(scale)
    kinds = {name: kind for name, kind, _ in DEMO_CATEGORIES}
    dup_src = (DUPLICATE_SOURCE[0], _index(DUPLICATE_SOURCE[1], plan[DUPLICATE_SOURCE[0]]))
    dup_dst = (DUPLICATE_TARGET[0], _index(DUPLICATE_TARGET[1], plan[DUPLICATE_TARGET[0]]))
    truncated = (TRUNCATED[0], _index(TRUNCATED[1], plan[TRUNCATED[0]]))
    forced = {(name, _index(i, plan[name])): fmt for (name, i), fmt in FORCED_FORMATS.items()}

    formats: Counter = Counter()
    written: dict[tuple[str, int], bytes] = {}
    paths: dict[tuple[str, int], str] = {}
    for name, n in plan.items():
        key = _name_key(name)
        params = _category_params(name, kinds[name], seed)
        folder = out / name
        folder.mkdir(exist_ok=True)
        for i in range(n):
            if (name, i) == dup_dst:
                continue  # written below as a byte copy of the duplicate's source
            rng = _rng(seed, key, i + 1)
            fmt = forced.get((name, i)) or _format_for(rng)
            if (name, i) == truncated:
                fmt = "jpeg_truncated"
            photo, alpha = _render_photo(params, rng, size)
            data = _encode(photo, alpha, fmt, rng)
            rel = f"{name}/{i:03d}.{EXTENSIONS[fmt]}"
            (out / rel).write_bytes(data)
            formats[fmt] += 1
            written[(name, i)] = data
            paths[(name, i)] = rel
    dup_rel = f"{dup_dst[0]}/{dup_dst[1]:03d}.jpg"
    (out / dup_rel).write_bytes(written[dup_src])
    formats["jpeg"] += 1
    paths[dup_dst] = dup_rel
    return {
        "categories": len(plan),
        "images": sum(plan.values()),
        "formats": dict(sorted(formats.items())),
        "per_category": dict(plan),
        "duplicate": [paths[dup_src], dup_rel],
        "truncated": paths[truncated],
        "seed": int(seed),
        "size": int(size),
        "scale": float(scale),
    }


def _has_content(path: Path) -> bool:
    """True when ``path`` holds anything other than hidden files (``.gitkeep`` etc.)."""
    return path.is_dir() and any(not p.name.startswith(".") for p in path.iterdir())


def _ensure(out_dir: str | Path, seed: int, size: int, scale: float) -> tuple[Path, dict | None]:
    return _ensure_generated(out_dir, lambda tmp: generate_demo_catalogue(tmp, seed=seed, size=size, scale=scale))


def _ensure_generated(out_dir: str | Path, generate: Callable[[Path], dict]) -> tuple[Path, dict | None]:
    """Run ``generate(tmp)`` into a hidden temporary sibling and rename it into place, when out_dir is empty."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"demo folder path {out} exists and is not a folder")
    if _has_content(out):
        return out, None
    out.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling: on the same file system (so the rename is atomic) and skipped by the image source.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        summary = generate(tmp)
        if out.exists():
            try:
                out.rmdir()  # empty: replace it with the finished catalogue in one rename
            except OSError:
                pass  # only hidden files (e.g. .gitkeep): keep them, move the category folders in
        if not out.exists():
            try:
                os.rename(tmp, out)
                return out, summary
            except OSError:
                if _has_content(out):  # another process finished first: keep its catalogue
                    return out, None
                raise
        for child in sorted(tmp.iterdir()):
            os.rename(child, out / child.name)
        return out, summary
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_demo_catalogue(out_dir: str | Path, seed: int = 0, size: int = 128, scale: float = 1.0) -> Path:
    """Generate the catalogue only when out_dir is missing or empty; return out_dir.

    The catalogue is rendered into a hidden temporary sibling folder and renamed into place, so a crash never
    leaves a half catalogue. A folder holding anything but hidden files (``.gitkeep``) is left untouched.
    """
    return _ensure(out_dir, seed, size, scale)[0]


# --------------------------------------------------------------------------------------------------------------
# demo query photos and a demo "new part line" for the search pipelines
# --------------------------------------------------------------------------------------------------------------
# A part line that is NOT in the demo catalogue (its shape kind, "arm", only exists there under the excluded
# family "Control Arm"): the search answers "unknown part" until its photos are added with search_add.
NEW_PART = ("Wishbone", "arm")
# (folder or None for no known answer, file name, category rendered, format). Fresh photos (other random draws
# than the catalogue's), so a match is never the identical file.
DEMO_QUERIES: list[tuple[str | None, str, str, str]] = [
    ("Brake Rotor", "query_1.jpg", "Brake Rotor", "jpeg"),
    ("Spark Plug", "query_2.jpg", "Spark Plug", "jpeg"),
    ("Gear", "query_3.png", "Gear", "png_rgba"),
    ("Oil Filter", "query_4.jpg", "Oil Filter", "jpeg_exif_rotated"),
    ("Hubcap", "query_5.jpg", "Hubcap", "jpeg"),
    (NEW_PART[0], "query_6.jpg", NEW_PART[0], "jpeg"),
    (None, "my photo.jpg", "Coil Spring", "jpeg"),
    (None, "unreadable.jpg", "Piston", "jpeg_truncated"),
]
NEW_PART_PHOTOS = 6
_QUERY_DRAW, _NEW_PART_DRAW = 50_000, 60_000


def _demo_kind(name: str) -> str:
    kinds = {n: k for n, k, _ in DEMO_CATEGORIES}
    return NEW_PART[1] if name == NEW_PART[0] else kinds[name]


def generate_demo_queries(out_dir: str | Path, seed: int = 0, size: int = 128) -> dict:
    """Render the demo query photos into out_dir; return ``{"files": [...], "truth": {file: label|None}}``.

    Photos of known demo categories in ``<out_dir>/<Category>/``, one of the absent part line
    :data:`NEW_PART` (the right answer is "unknown part" until it is added), one photo at the top level
    (no known answer) and one undecodable file (a truncated JPEG), deterministic like the catalogue.
    """
    out = Path(out_dir)
    truth: dict[str, str | None] = {}
    for i, (folder, filename, name, fmt) in enumerate(DEMO_QUERIES):
        rng = _rng(seed, _name_key(name), _QUERY_DRAW + i)
        photo, alpha = _render_photo(_category_params(name, _demo_kind(name), seed), rng, size)
        rel = f"{folder}/{filename}" if folder else filename
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(_encode(photo, alpha, fmt, rng))
        truth[rel] = folder
    return {"files": list(truth), "truth": truth, "new_part": NEW_PART[0]}


def generate_demo_new_parts(out_dir: str | Path, seed: int = 0, size: int = 128) -> dict:
    """Render a few catalogue photos of the absent part line :data:`NEW_PART` into ``<out_dir>/<name>/``."""
    name, kind = NEW_PART
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    params = _category_params(name, kind, seed)
    files = []
    for i in range(NEW_PART_PHOTOS):
        rng = _rng(seed, _name_key(name), _NEW_PART_DRAW + i)
        photo, alpha = _render_photo(params, rng, size)
        (folder / f"{i:03d}.jpg").write_bytes(_encode(photo, alpha, "jpeg", rng))
        files.append(f"{name}/{i:03d}.jpg")
    return {"files": files, "label": name}


def ensure_demo_queries(out_dir: str | Path, seed: int = 0, size: int = 128) -> Path:
    """Render the demo query photos only when out_dir is missing or empty (atomically); return out_dir."""
    return _ensure_generated(out_dir, lambda tmp: generate_demo_queries(tmp, seed=seed, size=size))[0]


def ensure_demo_new_parts(out_dir: str | Path, seed: int = 0, size: int = 128) -> Path:
    """Render the demo new part line only when out_dir is missing or empty (atomically); return out_dir."""
    return _ensure_generated(out_dir, lambda tmp: generate_demo_new_parts(tmp, seed=seed, size=size))[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m partmatch.demo",
                                     description="Render the deterministic synthetic demo parts catalogue.")
    parser.add_argument("out_dir", help="folder to create (must be missing or empty)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=128, help="base canvas size in pixels (default 128)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies photos per category (default 1.0)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    out, summary = _ensure(args.out_dir, args.seed, args.size, args.scale)
    if summary is None:
        print(f"{out} already exists and is not empty: nothing generated.", file=sys.stderr)
        return 1
    fmts = ", ".join(f"{k}={v}" for k, v in summary["formats"].items())
    print(f"Demo catalogue in {out}: {summary['categories']} categories, {summary['images']} images ({fmts}).")
    print(f"Duplicate pair: {summary['duplicate'][0]} == {summary['duplicate'][1]}; truncated: {summary['truncated']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
