"""The embedded synthetic dataset, written in any registered layout (data_prep/layouts.py): FLAIR #2,
Hameln, FLAIR-HUB. The layout's SynthSpec gives the geography (year, CRS, dates), its label codes and
the Writer of its files; the scenes are the same for every layout.

Each zone is a small landscape defined in metres (resolution independent), so the aerial patches and
the Sentinel-2 super-patch are rendered from the same geometry and agree in space:

* regions: argmax of smooth random fields plus per-class biases -> FLAIR-like imbalance (grass, crop and
  deciduous dominate; water, bare soil, pervious are rarer); zone kinds U/A/N shift the biases;
* objects: roads (long impervious strips), a river, buildings (compact rotated rectangles with a dark rim,
  a roof ridge and a cast shadow), pools and greenhouses (rare, folded into 'other' / unlabelled);
* grass, crop and deciduous share the same aerial colour and texture: only their NDVI phenology differs
  (crop: green-up in spring, harvest in July; grass: steady; deciduous: leaf-off in winter);
* buildings and impervious surfaces share one spectrum (aerial and Sentinel-2): only shape and texture
  at aerial resolution separate them;
* Sentinel-2 pixels mix the spectra of the classes under them (4 x 4 sub-samples per 10 m pixel); some
  dates are cloudy (bright values, high cloud probability), some snowy, and zones miss some dates.

The aerial footprint is 102.4 m as in FLAIR #2 (512 px at 0.2 m): gsd = 102.4 / patch_size.
Realism options (`Realism`, each off by default, and then the output is byte-identical to the
generator without them; each draws from its own random stream, so turning one on changes nothing else):
* label noise: boundary jitter (each label pixel takes the class of a point at most N px away, along a
  smooth random displacement field) and a share of wrong region labels (a connected region of a
  land-cover class -- grass, crop, forest, ... not objects -- relabelled as another region class);
* domain shift: a radiometric gain and offset per zone (aerial and Sentinel-2), an extra gain per
  Sentinel-2 acquisition, and the phenology of a region (a pair of zones, as FLAIR #2's departments)
  shifted by some days: a model fit on the training zones meets other radiometry and seasons in the
  held-out zones;
* more zones: `num_zones` (zone kinds cycle urban / agricultural / natural).

Every class (`every_class`, the layout's default unless given; FLAIR #2 and FLAIR-HUB: on, Hameln: off,
so that its output stays what it was): small square plots (4 m, in 16 m cells, 6 % of the area) of the
classes the scenes lack (vineyard, plowed land, snow, clear cut, ligneous, mixed, reed, undefined) and
of every other class, laid on a lattice of period 5 cells: any 102.4 m patch holds a full 5 x 5 block
of cells, so every labelled patch holds every class of its layout (before label noise).

Everything is drawn from numpy Generators seeded by (seed, zone, patch): same seed, same bytes.
CLI: `python -m data_prep synth --layout=flair2 --out=DIR --num-zones=4 --seed=0`.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import pathlib
from typing import Optional

import numpy as np
import rasterio
import rasterio.transform
import scipy.ndimage

from data_prep import layouts
from lcssl.data.schema import S2_BANDS, S2_GSD_M

FOOTPRINT_M = 102.4          # FLAIR #2 aerial patch: 512 px x 0.2 m
SUBSAMPLES = 4               # per 10 m pixel and axis, for class fractions under a Sentinel-2 pixel
SLOT_PX = 11                 # patch spacing in Sentinel-2 px: > 10.24, so aerial patches never overlap

# A small preset for tests: 2 zones x (2 labelled + 1 unlabelled) patches of 32 px, 6 dates.
TINY = dict(num_zones=2, patches_per_zone=2, unlabelled_per_zone=1, patch_size=32, num_dates=6)

# Extra random streams (appended to the (seed, zone[, patch]) seed sequence) for the realism options,
# so that the default draws stay what they were.
_SHIFT_STREAM, _NOISE_STREAM, _PHENOLOGY_STREAM = 1_000_001, 1_000_002, 1_000_003
AERIAL_FULL_SCALE = 255.0    # zone_offset is a fraction of these (aerial grey levels, S2 reflectance x 1e4)
S2_FULL_SCALE = 10000.0
JITTER_WAVELENGTH_M = (20.0, 60.0)   # boundary jitter: smooth displacement field, wobbles of this size


@dataclasses.dataclass(frozen=True)
class Realism:
    """Label noise and domain shift options; the defaults (all zero) leave the data unchanged.

    boundary_jitter_px: every label pixel (r, c) takes the true class at (r + dr, c + dc), with integer
        |dr|, |dc| <= this, dr and dc smooth in space: boundaries move by at most this many pixels.
    wrong_region_share: each connected region of one region class (grass, crop, deciduous, conifer,
        bare soil, pervious, water, brush; 4-connected, within the patch) is relabelled as another
        region class with this probability. Objects (buildings, roads, river, pools) keep their label.
    zone_gain: each zone's radiometric gain is uniform in [1 - zone_gain, 1 + zone_gain] (both modalities,
        elevation excepted).
    zone_offset: each zone's offset is uniform in [-zone_offset, zone_offset] x full scale (255 aerial
        grey levels; 10000 Sentinel-2 reflectance units), added after the gain.
    date_gain: each Sentinel-2 acquisition of a zone gets a further gain uniform in [1 - date_gain,
        1 + date_gain] (atmosphere, sensor), on top of the small one every date already has.
    phenology_shift_days: each region (zones 2k and 2k+1) gets a shift uniform in [-d, d] days of every
        class's vegetation cycle, on top of the few days of every zone.
    """
    boundary_jitter_px: int = 0
    wrong_region_share: float = 0.0
    zone_gain: float = 0.0
    zone_offset: float = 0.0
    date_gain: float = 0.0
    phenology_shift_days: float = 0.0

    def __post_init__(self):
        bad = []
        if not (isinstance(self.boundary_jitter_px, (int, np.integer)) and self.boundary_jitter_px >= 0):
            bad.append(f"boundary_jitter_px={self.boundary_jitter_px!r} (expected an integer >= 0)")
        if not 0.0 <= self.wrong_region_share <= 1.0:
            bad.append(f"wrong_region_share={self.wrong_region_share!r} (expected 0..1)")
        for name in ("zone_gain", "date_gain"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad.append(f"{name}={getattr(self, name)!r} (expected 0 <= value < 1)")
        if not 0.0 <= self.zone_offset <= 0.5:
            bad.append(f"zone_offset={self.zone_offset!r} (expected 0..0.5 of full scale)")
        if not 0.0 <= self.phenology_shift_days <= 120:
            bad.append(f"phenology_shift_days={self.phenology_shift_days!r} (expected 0..120)")
        if bad:
            raise ValueError("synthetic data options: " + "; ".join(bad))

    @property
    def noisy_labels(self) -> bool:
        return self.boundary_jitter_px > 0 or self.wrong_region_share > 0

    @property
    def shifted(self) -> bool:
        return self.zone_gain > 0 or self.zone_offset > 0 or self.date_gain > 0


# ----------------------------------------------------------------------------- classes

(BUILDING, PERVIOUS, IMPERVIOUS, BARE, WATER, RIVER, CONIFER, DECIDUOUS, BRUSH, GRASS, CROP, POOL,
 GREENHOUSE, VINEYARD, PLOWED, SNOW_COVER, CLEAR_CUT, LIGNEOUS, MIXED, REED, UNDEFINED) = range(21)
INTERNAL_CLASSES = ("building", "pervious", "impervious", "bare soil", "water", "river", "coniferous",
                    "deciduous", "brushwood", "grass", "crop", "pool", "greenhouse", "vineyard", "plowed land",
                    "snow", "clear cut", "ligneous", "mixed", "reed", "undefined")
NUM_INTERNAL = len(INTERNAL_CLASSES)
# The scenes' own classes; the others only appear as every_class plots. Without plots, fractions and
# spectra are computed over these 13 only, so that the output stays byte-identical.
NUM_SCENE = 13
PLOT_CELL_M, PLOT_SIZE_M, PLOT_PERIOD = 16.0, 4.0, 5
REGION_CLASSES = (GRASS, CROP, DECIDUOUS, CONIFER, BARE, PERVIOUS, WATER, BRUSH)
# Region biases (higher = more frequent): a few dominant classes, some rare ones, as in FLAIR #2.
REGION_BIAS = {GRASS: 0.55, CROP: 0.45, DECIDUOUS: 0.45, CONIFER: -0.15, BARE: -0.45, PERVIOUS: -0.35,
               WATER: -0.6, BRUSH: -0.3}
KIND_BIAS = {"U": {PERVIOUS: 0.45, GRASS: 0.1, CROP: -0.4},
             "A": {CROP: 0.4, BARE: 0.25, CONIFER: -0.2},
             "N": {DECIDUOUS: 0.25, CONIFER: 0.35, WATER: 0.3, CROP: -0.3}}
NUM_BUILDINGS = {"U": 450, "A": 60, "N": 25}    # per km2: ~10 % roofs in urban zones

# Raw label codes of the internal classes: each layout's SynthSpec.codes.

# Aerial colour (R, G, B, NIR) and noise. Building == impervious and grass == crop == deciduous on purpose.
_VEG_RGBN = (85, 112, 62, 165)
_GREY_RGBN = (125, 120, 115, 105)
AERIAL_RGBN = np.array([
    _GREY_RGBN, (150, 140, 115, 135), _GREY_RGBN, (160, 128, 95, 125), (35, 55, 70, 18), (35, 55, 70, 18),
    (45, 72, 50, 120), _VEG_RGBN, (95, 105, 68, 150), _VEG_RGBN, _VEG_RGBN, (70, 160, 205, 50),
    (215, 218, 222, 190),
    # vineyard, plowed land, snow, clear cut, ligneous, mixed, reed, undefined
    (105, 110, 70, 140), (120, 92, 70, 95), (240, 242, 246, 225), (135, 120, 90, 120), (70, 95, 55, 140),
    (60, 85, 55, 130), (110, 120, 80, 135), (20, 20, 20, 20)], np.float32)
AERIAL_NOISE = np.array([6, 10, 6, 10, 4, 4, 18, 14, 14, 14, 14, 5, 5, 12, 8, 3, 12, 14, 16, 10, 4], np.float32)
AERIAL_TEXTURE = np.array([0, .05, 0, .08, .02, .02, .2, .12, .12, .12, .12, 0, 0,
                           .2, .1, 0, .15, .15, .18, .08, 0], np.float32)

# Sentinel-2 L2A endmembers, reflectance x 10000, bands as schema.S2_BANDS (B02..B12).
VEG = np.array([300, 600, 300, 900, 2400, 2900, 3200, 3300, 1800, 900], np.float32)
SOIL = np.array([900, 1200, 1500, 1800, 2000, 2200, 2400, 2500, 3000, 2600], np.float32)
URBAN = np.array([1100, 1200, 1300, 1400, 1500, 1550, 1600, 1650, 1900, 1700], np.float32)
H2O = np.array([600, 700, 500, 400, 300, 250, 200, 180, 100, 80], np.float32)
CLOUD = np.array([7000, 7000, 7100, 7200, 7300, 7300, 7400, 7400, 5500, 4500], np.float32)
SNOW = np.array([8500, 8600, 8700, 8600, 8300, 8200, 8000, 7900, 900, 700], np.float32)
BACKGROUND = [URBAN, SOIL, URBAN, SOIL, H2O, H2O, SOIL, SOIL, SOIL, SOIL, SOIL, H2O, 1.4 * URBAN,
              SOIL, SOIL, SNOW, SOIL, SOIL, SOIL, H2O, URBAN]

# Vegetation cover through the year: (day of year knots, cover) per class; flat when one value.
PHENOLOGY = {
    BUILDING: 0.03, IMPERVIOUS: 0.03, PERVIOUS: 0.3, BARE: 0.05, WATER: 0.0, RIVER: 0.0, CONIFER: 0.8,
    POOL: 0.0, GREENHOUSE: 0.0, SNOW_COVER: 0.0, UNDEFINED: 0.0, CLEAR_CUT: 0.25, LIGNEOUS: 0.7, MIXED: 0.75,
    VINEYARD: ((1, 120, 170, 270, 300, 366), (0.1, 0.1, 0.6, 0.6, 0.15, 0.1)),
    PLOWED: ((1, 200, 230, 366), (0.15, 0.15, 0.02, 0.02)),
    REED: ((1, 120, 180, 260, 366), (0.35, 0.4, 0.8, 0.6, 0.35)),
    GRASS: ((1, 100, 180, 240, 366), (0.55, 0.65, 0.5, 0.6, 0.55)),
    CROP: ((1, 80, 150, 190, 205, 280, 300, 366), (0.1, 0.1, 0.9, 0.9, 0.05, 0.05, 0.15, 0.15)),
    DECIDUOUS: ((1, 110, 140, 280, 310, 366), (0.2, 0.2, 0.85, 0.85, 0.2, 0.2)),
    BRUSH: ((1, 110, 150, 280, 320, 366), (0.3, 0.3, 0.6, 0.6, 0.3, 0.3)),
}


def vegetation_cover(cls: int, doy: np.ndarray, shift_days: float = 0.0) -> np.ndarray:
    """Vegetation fraction 0..1 of an internal class on the given days of year."""
    spec = PHENOLOGY[cls]
    if isinstance(spec, float):
        return np.full(np.shape(doy), spec, np.float32)
    knots, cover = spec
    return np.interp(np.asarray(doy, np.float64) - shift_days, knots, cover).astype(np.float32)


def spectra(doy: np.ndarray, shift_days: float = 0.0, num_classes: int = NUM_SCENE) -> np.ndarray:
    """[num_classes, T, 10] reflectance of each class on each date: soil/urban/water mixed with VEG."""
    out = np.empty((num_classes, len(doy), len(S2_BANDS)), np.float32)
    for cls in range(num_classes):
        cover = vegetation_cover(cls, doy, shift_days)[:, None]
        out[cls] = (1 - cover) * BACKGROUND[cls] + cover * VEG
    return out


# ----------------------------------------------------------------------------- zone geometry

class Zone:
    """One landscape: random fields and objects in metres, (0, 0) = top-left, y pointing down (south)."""

    def __init__(self, rng: np.random.Generator, kind: str, size_m: float):
        self.kind, self.size_m = kind, size_m
        j = 5
        num = len(REGION_CLASSES)
        angle = rng.uniform(0, 2 * np.pi, (num, j))
        wavelength = rng.uniform(150, 500, (num, j))
        self.kx = (2 * np.pi * np.cos(angle) / wavelength).ravel().astype(np.float32)
        self.ky = (2 * np.pi * np.sin(angle) / wavelength).ravel().astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, num * j).astype(np.float32)
        self.bias = np.array([REGION_BIAS[c] + KIND_BIAS[kind].get(c, 0.0) for c in REGION_CLASSES], np.float32)
        self.bias += rng.normal(0, 0.1, num).astype(np.float32)
        t_angle = rng.uniform(0, 2 * np.pi, 3)
        t_wave = rng.uniform(300, 800, 3)
        self.terrain = (t_angle, t_wave, rng.uniform(0, 2 * np.pi, 3), rng.uniform(60, 120))

        centre = size_m / 2
        num_roads = {"U": 3, "A": 2, "N": 1}[kind]
        self.roads = []                       # (x0, y0, normal x, normal y, half width)
        for _ in range(num_roads):
            theta = rng.uniform(0, np.pi)
            x0, y0 = rng.uniform(0.2, 0.8, 2) * size_m
            self.roads.append((x0, y0, -np.sin(theta), np.cos(theta), rng.uniform(3, 4.5)))
        self.river = None                     # (x0, y0, theta, amplitude, wavelength, half width)
        if rng.random() < 0.5:
            self.river = (centre + rng.uniform(-100, 100), centre + rng.uniform(-100, 100),
                          rng.uniform(0, np.pi), rng.uniform(10, 40), rng.uniform(200, 400), rng.uniform(5, 10))

        # Buildings: rotated rectangles (cx, cy, ux, uy, half length, half width) with a height for the
        # shadow; aligned with a road when there is one, rejected on water and roads.
        area_km2 = (size_m / 1000) ** 2
        wanted = int(round(NUM_BUILDINGS[kind] * area_km2))
        buildings, heights = [], []
        for _ in range(wanted * 4):
            if len(buildings) == wanted:
                break
            cx, cy = rng.uniform(0, size_m, 2)
            theta = (np.arctan2(self.roads[0][3], self.roads[0][2]) + np.pi / 2 * rng.integers(0, 2)
                     if rng.random() < 0.7 else rng.uniform(0, np.pi))
            rect = (cx, cy, np.cos(theta), np.sin(theta), rng.uniform(5, 13), rng.uniform(4, 8))
            base = self.regions(np.array([cx], np.float32), np.array([cy], np.float32))[0]
            if base == WATER or self._on_strip(np.array([cx]), np.array([cy]), margin=rect[4] + 2)[0]:
                continue
            buildings.append(rect)
            heights.append(rng.uniform(4, 12))
        self.buildings = np.array(buildings, np.float32).reshape(-1, 6)
        self.heights = np.array(heights, np.float32)
        # Rare objects: pools beside some buildings, greenhouses in agricultural zones.
        pools = []
        for rect in self.buildings:
            if rng.random() < (0.25 if kind == "U" else 0.1):
                off = rect[4] + rng.uniform(6, 10)
                pools.append((rect[0] + off * rect[3], rect[1] - off * rect[2], rect[2], rect[3],
                              rng.uniform(2, 4), rng.uniform(2, 3)))
        self.pools = np.array(pools, np.float32).reshape(-1, 6)
        houses = []
        for _ in range(rng.integers(1, 4) if kind == "A" else 0):
            theta = rng.uniform(0, np.pi)
            houses.append((*rng.uniform(0.1, 0.9, 2) * size_m, np.cos(theta), np.sin(theta),
                           rng.uniform(12, 25), rng.uniform(5, 8)))
        self.greenhouses = np.array(houses, np.float32).reshape(-1, 6)
        self.plot_classes = None      # every_class: internal class of each lattice cell residue

    def add_plots(self, plot_classes) -> None:
        """Lay every_class plots: cell (i, j) of the PLOT_CELL_M lattice holds a PLOT_SIZE_M square of
        plot_classes[(i % PLOT_PERIOD) * PLOT_PERIOD + j % PLOT_PERIOD] (residues past the list repeat it)."""
        if not 0 < len(plot_classes) <= PLOT_PERIOD ** 2:
            raise ValueError(f"every_class: 1..{PLOT_PERIOD ** 2} classes, got {len(plot_classes)}")
        self.plot_classes = np.resize(np.asarray(plot_classes, np.int8), PLOT_PERIOD ** 2)

    def _plots(self, x, y):
        """(in a plot, its class) per point."""
        i, j = np.floor(y / PLOT_CELL_M).astype(int), np.floor(x / PLOT_CELL_M).astype(int)
        inside = ((np.abs(y - i * PLOT_CELL_M - PLOT_CELL_M / 2) < PLOT_SIZE_M / 2)
                  & (np.abs(x - j * PLOT_CELL_M - PLOT_CELL_M / 2) < PLOT_SIZE_M / 2))
        return inside, self.plot_classes[(i % PLOT_PERIOD) * PLOT_PERIOD + j % PLOT_PERIOD]

    def regions(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        arg = x[:, None] * self.kx + y[:, None] * self.ky + self.phase
        fields = np.cos(arg).reshape(len(x), len(REGION_CLASSES), -1).sum(-1) * 0.45 + self.bias
        return np.asarray(REGION_CLASSES, np.int8)[fields.argmax(-1)]

    def _on_strip(self, x, y, margin=0.0):
        on = np.zeros(x.shape, bool)
        for x0, y0, nx, ny, half in self.roads:
            on |= np.abs((x - x0) * nx + (y - y0) * ny) <= half + margin
        return on

    def _on_river(self, x, y):
        if self.river is None:
            return np.zeros(x.shape, bool)
        x0, y0, theta, amp, wave, half = self.river
        along = (x - x0) * np.cos(theta) + (y - y0) * np.sin(theta)
        across = -(x - x0) * np.sin(theta) + (y - y0) * np.cos(theta)
        return np.abs(across - amp * np.sin(2 * np.pi * along / wave)) <= half

    def terrain_height(self, x, y):
        angle, wave, phase, scale = self.terrain
        h = sum(np.cos(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / w + p) for a, w, p in zip(angle, wave, phase))
        return 130 + scale * h / 3

    def classes(self, x: np.ndarray, y: np.ndarray, detail: bool = False):
        """Internal class per point; with detail also the building rim, ridge and shadow masks."""
        cls = self.regions(x, y)
        cls[self._on_river(x, y)] = RIVER
        cls[self._on_strip(x, y)] = IMPERVIOUS
        near = _near(self.buildings, x, y, extra=15.0)
        inside, rim, ridge = _in_rects(self.buildings[near], x, y, rim_m=1.2, ridge_m=0.5)
        cls[inside] = BUILDING
        cls[_in_rects(self.pools[_near(self.pools, x, y)], x, y)[0]] = POOL
        cls[_in_rects(self.greenhouses[_near(self.greenhouses, x, y)], x, y)[0]] = GREENHOUSE
        plots = None
        if self.plot_classes is not None:
            plots, plot_cls = self._plots(x, y)
            cls[plots] = plot_cls[plots]
        if not detail:
            return cls
        # Shadows fall north-east (sun in the south-west): the footprint shifted by 0.6 x height.
        shadow = np.zeros(x.shape, bool)
        for rect, height in zip(self.buildings[near], self.heights[near]):
            for step in (0.3, 0.6):
                shadow |= _in_rects(rect[None], x - step * height * 0.5, y + step * height)[0]
        shadow &= ~inside & (cls != POOL)
        if plots is not None:
            shadow &= ~plots
        return cls, rim & (cls == BUILDING), ridge & (cls == BUILDING), shadow


def _near(rects, x, y, extra=0.0):
    """Rectangles whose bounding circle can touch the points' bounding box (pure speed-up)."""
    if len(rects) == 0 or len(x) == 0:
        return np.zeros(len(rects), bool)
    reach = np.hypot(rects[:, 4], rects[:, 5]) + extra
    return ((rects[:, 0] + reach >= x.min()) & (rects[:, 0] - reach <= x.max())
            & (rects[:, 1] + reach >= y.min()) & (rects[:, 1] - reach <= y.max()))


def _in_rects(rects, x, y, rim_m=0.0, ridge_m=0.0):
    inside = np.zeros(x.shape, bool)
    rim = np.zeros(x.shape, bool)
    ridge = np.zeros(x.shape, bool)
    for cx, cy, ux, uy, half_len, half_wid in rects:
        along = (x - cx) * ux + (y - cy) * uy
        across = -(x - cx) * uy + (y - cy) * ux
        hit = (np.abs(along) <= half_len) & (np.abs(across) <= half_wid)
        inside |= hit
        rim |= hit & ((half_len - np.abs(along) < rim_m) | (half_wid - np.abs(across) < rim_m))
        ridge |= hit & (np.abs(across) < ridge_m)
    return inside, rim & inside, ridge & ~rim


# ----------------------------------------------------------------------------- rendering

def _grid(top_m, left_m, rows, cols, step_m):
    """Centres of a rows x cols grid of step_m pixels whose top-left corner is (left_m, top_m)."""
    y = top_m + (np.arange(rows, dtype=np.float32) + 0.5) * step_m
    x = left_m + (np.arange(cols, dtype=np.float32) + 0.5) * step_m
    yy, xx = np.meshgrid(y, x, indexing="ij")
    return xx.ravel(), yy.ravel()


def class_fractions(zone: Zone, height_px: int, width_px: int) -> np.ndarray:
    """[classes, h, w] share of each class under each 10 m pixel of the super-patch (classes: the
    scene's 13, all NUM_INTERNAL when the zone has every_class plots)."""
    step = S2_GSD_M / SUBSAMPLES
    x, y = _grid(0.0, 0.0, height_px * SUBSAMPLES, width_px * SUBSAMPLES, step)
    cls = zone.classes(x, y).reshape(height_px, SUBSAMPLES, width_px, SUBSAMPLES)
    num = NUM_INTERNAL if zone.plot_classes is not None else NUM_SCENE
    onehot = cls[None] == np.arange(num, dtype=np.int8)[:, None, None, None, None]
    return onehot.mean(axis=(2, 4), dtype=np.float32)


def _smooth_field(rng, x, y, wavelengths=(150, 600), terms=4):
    angle = rng.uniform(0, 2 * np.pi, terms)
    wave = rng.uniform(*wavelengths, terms)
    phase = rng.uniform(0, 2 * np.pi, terms)
    return sum(np.cos(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / w + p)
               for a, w, p in zip(angle, wave, phase)) / np.sqrt(terms / 2)


def render_series(rng, zone: Zone, fractions: np.ndarray, doy: np.ndarray, region_shift_days: float = 0.0,
                  radiometry: Optional[tuple] = None):
    """Super-patch [T, 10, h, w] uint16 and cloud/snow masks [T, 2, h, w] uint8 (percent).

    region_shift_days: added to the zone's own phenology shift. radiometry: (gain, offset in reflectance
    x 1e4, per-date gains [T]) applied to what the sensor saw (clouds included): gain x date gain x
    value + offset, before rounding.
    """
    _, height, width = fractions.shape
    shift = rng.normal(0, 6) + region_shift_days               # zone phenology shift, days
    spec = spectra(doy, shift, len(fractions))                 # [K, T, 10]
    clean = np.einsum("khw,ktb->tbhw", fractions, spec)
    gain = rng.uniform(0.95, 1.05, (len(doy), 1, 1, 1))        # per-date atmosphere
    series = clean * gain + rng.normal(0, 60, clean.shape)
    masks = np.zeros((len(doy), 2, height, width), np.uint8)
    x, y = _grid(0.0, 0.0, height, width, S2_GSD_M)
    for t, day in enumerate(doy):
        noise = rng.uniform(0, 8, (height, width))
        if rng.random() < 0.35:                                # cloudy date: partial or full cover
            field = _smooth_field(rng, x, y).reshape(height, width)
            level = rng.uniform(-2.0, 1.0)
            prob = 1 / (1 + np.exp(-(field - level) / 0.15))
            masks[t, 0] = np.clip(np.rint(100 * prob + noise), 0, 100)
            series[t] = (1 - 0.9 * prob) * series[t] + 0.9 * prob * CLOUD[:, None, None]
        else:
            masks[t, 0] = np.rint(noise)
        if (day < 60 or day > 335) and rng.random() < 0.5:     # winter snow on part of the zone
            field = _smooth_field(rng, x, y).reshape(height, width)
            prob = 1 / (1 + np.exp(-(field - rng.uniform(-0.5, 1.0)) / 0.15))
            masks[t, 1] = np.clip(np.rint(100 * prob), 0, 100)
            series[t] = (1 - 0.8 * prob) * series[t] + 0.8 * prob * SNOW[:, None, None]
    if radiometry is not None:
        gain, offset, date_gains = radiometry
        series = gain * np.asarray(date_gains, np.float64)[:, None, None, None] * series + offset
    return np.clip(np.rint(series), 0, 65535).astype(np.uint16), masks


def render_aerial(rng, zone: Zone, top_m, left_m, size, with_elevation: bool, radiometry: Optional[tuple] = None):
    """Aerial [size, size, 4 or 5] uint8 and internal classes [size, size] for one patch.

    radiometry: (gain, offset in grey levels) of the zone, applied to R, G, B, NIR before rounding.
    """
    gsd = FOOTPRINT_M / size
    x, y = _grid(top_m, left_m, size, size, gsd)
    cls, rim, ridge, shadow = zone.classes(x, y, detail=True)
    cls, rim, ridge, shadow = (a.reshape(size, size) for a in (cls, rim, ridge, shadow))
    coarse_px = max(1, size // 16)                             # crown / field texture at ~6 m
    coarse = rng.normal(0, 1, (-(-size // coarse_px),) * 2)
    coarse = np.kron(coarse, np.ones((coarse_px, coarse_px)))[:size, :size, None]
    white = rng.normal(0, 1, (size, size, 4))
    img = AERIAL_RGBN[cls] * (1 + AERIAL_TEXTURE[cls][..., None] * coarse) + AERIAL_NOISE[cls][..., None] * white
    img *= rng.uniform(0.92, 1.08)                             # illumination of the flight line
    img[rim] *= 0.75
    img[ridge] *= 1.15
    img[shadow] *= 0.5
    if radiometry is not None:
        img = radiometry[0] * img + radiometry[1]
    bands = [img]
    if with_elevation:
        # Terrain only (no object heights), so elevation never shortcuts the texture/phenology tasks.
        terrain = zone.terrain_height(x, y).reshape(size, size, 1) + rng.normal(0, 1.5, (size, size, 1))
        bands.append(terrain)
    return np.clip(np.rint(np.concatenate(bands, -1)), 0, 255).astype(np.uint8), cls


def noisy_labels(rng, zone: Zone, top_m, left_m, size, realism: Realism) -> np.ndarray:
    """Internal classes [size, size] of a patch with `realism`'s label noise (see `Realism`).

    Wrong regions are drawn on the patch's class map extended by the jitter margin, then the
    boundary jitter reads that map at the displaced pixels.
    """
    gsd = FOOTPRINT_M / size
    n = int(realism.boundary_jitter_px)
    ext_size = size + 2 * n
    x, y = _grid(top_m - n * gsd, left_m - n * gsd, ext_size, ext_size, gsd)
    cls = zone.classes(x, y).reshape(ext_size, ext_size)
    if realism.wrong_region_share > 0:
        out = cls.copy()
        for c in REGION_CLASSES:
            components, count = scipy.ndimage.label(cls == c)
            flip = np.flatnonzero(rng.random(count) < realism.wrong_region_share) + 1
            others = np.array([o for o in REGION_CLASSES if o != c], np.int8)
            for component, new in zip(flip, rng.choice(others, size=len(flip))):
                out[components == component] = new
        cls = out
    if n == 0:
        return cls
    px, py = _grid(top_m, left_m, size, size, gsd)
    dr, dc = (np.clip(np.rint(n * np.tanh(_smooth_field(rng, px, py, JITTER_WAVELENGTH_M))), -n, n)
              .astype(int).reshape(size, size) for _ in range(2))
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return cls[rows + n + dr, cols + n + dc]


def _acquisition_days(rng, num_dates, first_doy, last_doy):
    """Sorted distinct days of year, roughly evenly spread, jittered by up to 6 days."""
    base = np.linspace(first_doy, last_doy, num_dates)
    days = np.clip(np.rint(base + rng.uniform(-6, 6, num_dates)), first_doy, last_doy).astype(int)
    days = np.unique(days)
    while len(days) < num_dates:                               # collisions only happen for dense series
        days = np.unique(np.append(days, rng.integers(first_doy, last_doy + 1)))
    return days


# ----------------------------------------------------------------------------- dataset

def write_dataset(out_dir, *, layout: str = "flair2", num_zones: int = 4, patches_per_zone: int = 6,
                  patch_size: int = 64, sits_size: int = 40, num_dates: Optional[int] = None,
                  unlabelled_per_zone: int = 2, seed: int = 0, realism: Realism = Realism(),
                  every_class: Optional[bool] = None, test_zones: int = 0) -> dict:
    """Write the synthetic dataset under out_dir in `layout` (a name in data_prep/layouts.py); returns a
    summary.

    realism: label noise and domain shift (see `Realism`); the summary records each zone's drawn gain,
    offset, date gains and phenology shift, and the label noise actually applied.
    every_class: plots of every class in every zone (module docstring); None: the layout's default.
    test_zones: the last this many zones go to the layout's released test folders (FLAIR #2).

    num_dates: acquisitions per zone before missing dates (default: the layout's, 12 over 2021 for
    flair2, 8 from February to November 2022 for hameln, as the seminar's series). FLAIR #2 zones miss
    0-2 dates; a third of the Hameln patches miss one date.
    """
    spec = layouts.get(layout).synth
    if num_zones < 1 or patches_per_zone < 0 or unlabelled_per_zone < 0 or patches_per_zone + unlabelled_per_zone < 1:
        raise ValueError(f"expected num_zones >= 1 and at least one patch per zone, got num_zones={num_zones}, "
                         f"patches_per_zone={patches_per_zone}, unlabelled_per_zone={unlabelled_per_zone}")
    if patch_size < 8 or sits_size < math.ceil(FOOTPRINT_M / S2_GSD_M):
        raise ValueError(f"expected patch_size >= 8 and sits_size >= 11 (the 102.4 m footprint), "
                         f"got patch_size={patch_size}, sits_size={sits_size}")
    if test_zones and not spec.test_folders:
        raise ValueError(f"test_zones={test_zones}: layout {layout!r} has no released test folders")
    if not 0 <= test_zones < num_zones:
        raise ValueError(f"test_zones: expected 0..{num_zones - 1} (some zones must stay for training), "
                         f"got {test_zones}")
    num_dates = spec.num_dates if num_dates is None else num_dates
    if num_dates < 2:
        raise ValueError(f"num_dates: expected >= 2, got {num_dates}")
    every_class = spec.every_class if every_class is None else bool(every_class)
    plots = spec.plot_classes() if every_class else None
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gsd = FOOTPRINT_M / patch_size
    year, first_doy, last_doy, crs, origin = spec.year, spec.first_doy, spec.last_doy, spec.crs, spec.origin
    codes_lut = np.asarray(spec.codes, np.uint8)
    writer = spec.writer(out)

    per_zone = patches_per_zone + unlabelled_per_zone
    side = math.ceil(math.sqrt(per_zone))
    super_px = sits_size + (side - 1) * SLOT_PX + 4
    zones, pixel_counts = [], np.zeros(256, np.int64)
    num_labelled = num_unlabelled = noisy_pixels = 0
    patch_number = 0
    for zone_index in range(num_zones):
        rng = np.random.default_rng(np.random.SeedSequence([seed, zone_index]))
        kind = "UAN"[zone_index % 3]
        split = "test" if zone_index >= num_zones - test_zones else None
        domain, zone_name = writer.names(zone_index, year)
        zone = Zone(rng, kind, super_px * S2_GSD_M)
        if plots is not None:
            zone.add_plots(plots)
        fractions = class_fractions(zone, super_px, super_px)
        zone_dates = num_dates - (int(rng.integers(0, 3)) if spec.missing_zone_dates and num_dates > 4 else 0)
        doy = _acquisition_days(rng, zone_dates, first_doy, last_doy)
        dates = [datetime.date(year, 1, 1) + datetime.timedelta(days=int(d) - 1) for d in doy]
        region_shift = 0.0
        if realism.phenology_shift_days > 0:
            region_rng = np.random.default_rng(np.random.SeedSequence([seed, zone_index // 2, _PHENOLOGY_STREAM]))
            region_shift = float(region_rng.uniform(-realism.phenology_shift_days, realism.phenology_shift_days))
        shift_rng = np.random.default_rng(np.random.SeedSequence([seed, zone_index, _SHIFT_STREAM]))
        zone_gain = float(1 + realism.zone_gain * shift_rng.uniform(-1, 1))
        zone_offset = float(realism.zone_offset * shift_rng.uniform(-1, 1))
        date_gains = 1 + realism.date_gain * shift_rng.uniform(-1, 1, len(doy))
        series, masks = render_series(rng, zone, fractions, doy, region_shift,
                                      (zone_gain, zone_offset * S2_FULL_SCALE, date_gains) if realism.shifted else None)
        zone_x0 = origin[0] + zone_index * 5000.0              # zones 5 km apart
        zone_y0 = origin[1]
        writer.zone(rng, domain=domain, zone_name=zone_name, split=split, series=series, masks=masks, dates=dates)

        offset = int(rng.integers(0, 5))
        slots = rng.permutation(side * side)[:per_zone]
        labelled = np.zeros(per_zone, bool)
        labelled[:patches_per_zone] = True
        for index_in_zone, (slot, has_label) in enumerate(zip(slots, labelled)):
            patch_rng = np.random.default_rng(np.random.SeedSequence([seed, zone_index, int(slot) + 1]))
            patch_number += 1
            # Centroid (row, col): the Sentinel-2 pixel corner at the centre of the sits crop.
            row = sits_size // 2 + offset + (slot // side) * SLOT_PX
            col = sits_size // 2 + offset + (slot % side) * SLOT_PX
            top_m = row * S2_GSD_M - FOOTPRINT_M / 2
            left_m = col * S2_GSD_M - FOOTPRINT_M / 2
            aerial, cls = render_aerial(patch_rng, zone, top_m, left_m, patch_size, spec.with_elevation,
                                        (zone_gain, zone_offset * AERIAL_FULL_SCALE) if realism.shifted else None)
            if has_label and realism.noisy_labels:
                noise_rng = np.random.default_rng(np.random.SeedSequence([seed, zone_index, int(slot) + 1,
                                                                          _NOISE_STREAM]))
                clean = cls
                cls = noisy_labels(noise_rng, zone, top_m, left_m, patch_size, realism)
                noisy_pixels += int((cls != clean).sum())
            transform = rasterio.transform.Affine(gsd, 0.0, zone_x0 + left_m, 0.0, -gsd, zone_y0 - top_m)
            codes = codes_lut[cls]
            writer.patch(patch_rng, domain=domain, zone_name=zone_name, split=split, patch_number=patch_number,
                         zone_index=zone_index, index_in_zone=index_in_zone, aerial=aerial, codes=codes,
                         has_label=bool(has_label), crs=crs, transform=transform, centre_rc=(row, col),
                         series=series, masks=masks, dates=dates, sits_size=sits_size, seed=seed)
            if has_label:
                num_labelled += 1
                pixel_counts += np.bincount(codes.ravel(), minlength=256)
            else:
                num_unlabelled += 1
        zones.append({"domain": domain, "zone": zone_name, "kind": kind, "num_dates": len(dates),
                      "superpatch_px": super_px, "gain": zone_gain, "offset": zone_offset,
                      "date_gains": [float(g) for g in date_gains],
                      "phenology_shift_days": region_shift,
                      **({"split": split} if split else {})})

    paths = {"root": str(out), **writer.finish(seed=seed, year=year, crs=crs, gsd=gsd, patch_size=patch_size,
                                                sits_size=sits_size)}
    return {
        "layout": layout, "out_dir": str(out), "seed": seed, "num_zones": num_zones,
        "num_patches": num_labelled + num_unlabelled, "num_labelled": num_labelled,
        "num_unlabelled": num_unlabelled, "patch_size": patch_size, "aerial_gsd_m": gsd,
        "aerial_bands": list(spec.aerial_bands),
        "sits_size": sits_size, "crs": crs, "zones": zones, "realism": dataclasses.asdict(realism),
        **({"every_class": True} if every_class else {}), **({"test_zones": test_zones} if test_zones else {}),
        "noisy_label_pixels": noisy_pixels,
        "raw_label_pixels": {int(c): int(n) for c, n in enumerate(pixel_counts) if n},
        "paths": paths}
