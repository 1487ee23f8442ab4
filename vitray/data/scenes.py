"""Drawing inspection scenes: a part in its housing seat, seen from above, in one of two looks.

`draw_scenes` picks a batch's geometry (where each part sits relative to its seat is the
only thing its class decides); `render` paints the batch with the look's materials,
light, blur and sensor noise. Vectorised over the batch, channel-first, so that numpy
broadcasts along whole rows of pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_SHIFT_PX = (2.0, 5.0)    # defect shift at 64 px, scaled with the image size
_TOLERANCE_PX = 0.3       # play of a seated part (and across a defect's shift), at 64 px


@dataclass(frozen=True)
class Look:
    """A rendering style. Lengths are pixels at 64 px; colours are RGB in 0..1."""

    part: tuple[float, float]  # half width, half height of the part
    hole: tuple[float, float]  # half size of its opening (frame window or slot) as a share of the part's
    part_round: float
    hole_round: float
    clearance: float  # gap between a seated part and the seat wall
    margin: float  # housing wall around the seat
    seat_round: float
    housing_round: float
    max_angle_deg: float
    background: tuple[float, float, float]
    housing: tuple[float, float, float]
    floor: tuple[float, float, float]
    metal: tuple[float, float, float]
    texture: str  # "brushed" streaks or "speckle" grain
    light: str  # "gradient" across the image or a "spot"
    noise: str  # "gaussian" or signal-dependent "shot" noise with sensor row banding
    blur_px: tuple[float, float]


LOOKS = {
    # A silver frame in a dark plastic housing on a brushed aluminium plate, lit from one side.
    "synth": Look(
        part=(11.0, 8.5), hole=(0.72, 0.62), part_round=0.6, hole_round=0.4,
        clearance=1.0, margin=6.0, seat_round=0.5, housing_round=1.5, max_angle_deg=3.0,
        background=(0.62, 0.64, 0.66), housing=(0.21, 0.23, 0.26), floor=(0.07, 0.07, 0.08),
        metal=(0.80, 0.80, 0.77), texture="brushed", light="gradient", noise="gaussian",
        blur_px=(0.0, 0.8),
    ),
    # A portrait copper terminal with a slot in an ivory housing on a dark mat, under a spotlight.
    "alt": Look(
        part=(7.5, 11.5), hole=(0.17, 0.6), part_round=2.0, hole_round=1.2,
        clearance=1.3, margin=5.0, seat_round=2.0, housing_round=3.0, max_angle_deg=5.0,
        background=(0.10, 0.11, 0.13), housing=(0.86, 0.84, 0.78), floor=(0.42, 0.41, 0.40),
        metal=(0.88, 0.52, 0.28), texture="speckle", light="spot", noise="shot",
        blur_px=(0.3, 1.1),
    ),
}


@dataclass(frozen=True)
class Scenes:
    """Geometry of a batch of scenes in pixels; u, v is the housing's own frame."""

    unit: np.ndarray  # (B,) pixels per 64-px pixel, times a random scale of the whole scene
    centre: np.ndarray  # (B, 2) seat centre in the image
    angle: np.ndarray  # (B,) rotation of housing and part, radians
    part: np.ndarray  # (B, 2) part half size
    seat: np.ndarray  # (B, 2) seat half size
    housing: np.ndarray  # (B, 2) housing half size
    offset: np.ndarray  # (B, 2) part centre relative to the seat centre, in u, v


def draw_scenes(direction: np.ndarray, size: int, look: Look, rng: np.random.Generator) -> Scenes:
    """Random geometry per scene; only `offset` depends on the class, through its shift `direction` (B, 2)."""
    b = len(direction)
    s = size / 64
    unit = s * rng.uniform(0.9, 1.1, b)
    part = np.array(look.part) * unit[:, None] * rng.uniform(0.92, 1.08, (b, 2))
    seat = part + look.clearance * unit[:, None]
    housing = seat + look.margin * unit[:, None]
    angle = np.radians(rng.uniform(-look.max_angle_deg, look.max_angle_deg, b))
    # Jitter the whole housing as far as it stays in the image, so that only the part's
    # position relative to its seat tells the class.
    c, si = np.abs(np.cos(angle)), np.abs(np.sin(angle))
    reach = np.stack([housing[:, 0] * c + housing[:, 1] * si, housing[:, 0] * si + housing[:, 1] * c], 1)
    room = np.maximum(size / 2 - reach - 1.5 * s, 0)
    centre = size / 2 + rng.uniform(-1, 1, (b, 2)) * room

    direction = np.asarray(direction, dtype=float).reshape(b, 2)
    shift = rng.uniform(*_SHIFT_PX, b)[:, None] * s
    play = rng.uniform(-_TOLERANCE_PX, _TOLERANCE_PX, (b, 2)) * s
    offset = direction * shift + play * (1 - np.abs(direction))  # play only across the shift
    return Scenes(unit, centre, angle, part, seat, housing, offset)


def _rotated_box(centre: np.ndarray, angle: np.ndarray, half: np.ndarray, size: int) -> list[list[float]]:
    """Axis-aligned x1, y1, x2, y2 of rotated rectangles, clipped to the image, 2 decimals."""
    c, s = np.abs(np.cos(angle)), np.abs(np.sin(angle))
    ex = half[:, 0] * c + half[:, 1] * s
    ey = half[:, 0] * s + half[:, 1] * c
    box = np.stack([centre[:, 0] - ex, centre[:, 1] - ey, centre[:, 0] + ex, centre[:, 1] + ey], 1)
    return np.round(np.clip(box, 0, size), 2).tolist()


def part_boxes(sc: Scenes, size: int) -> list[list[float]]:
    cos, sin = np.cos(sc.angle), np.sin(sc.angle)
    du, dv = sc.offset[:, 0], sc.offset[:, 1]
    centre = sc.centre + np.stack([cos * du - sin * dv, sin * du + cos * dv], 1)
    return _rotated_box(centre, sc.angle, sc.part, size)


def seat_boxes(sc: Scenes, size: int) -> list[list[float]]:
    return _rotated_box(sc.centre, sc.angle, sc.seat, size)


def _sdf_box(u, v, cu, cv, half_u, half_v, radius) -> np.ndarray:
    """Signed distance in pixels to a rounded rectangle, negative inside."""
    qu = np.abs(u - cu) - (half_u - radius)
    qv = np.abs(v - cv) - (half_v - radius)
    ou, ov = np.maximum(qu, 0), np.maximum(qv, 0)
    return np.sqrt(ou * ou + ov * ov) + np.minimum(np.maximum(qu, qv), 0) - radius


def _cover(distance: np.ndarray, width: float | np.ndarray = 1.0) -> np.ndarray:
    """Share of a pixel inside a shape: a ramp one pixel wide antialiases sub-pixel shifts;
    a wider one makes a soft shadow."""
    return np.clip(0.5 - distance / width, 0, 1)


def _stretch(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix that linearly interpolates n_in lattice values onto n_out pixels."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    weight = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), lo), 1 - weight)
    np.add.at(m, (np.arange(n_out), hi), weight)
    return m


def _noise_field(rng: np.random.Generator, b: int, size: int, rows: int, cols: int) -> np.ndarray:
    """(B, 1, size, size) gaussian noise on a rows x cols lattice, stretched bilinearly."""
    lattice = rng.standard_normal((b, rows, cols), dtype=np.float32)
    if rows != size:  # one matrix product for the whole batch rather than one per image
        lattice = (_stretch(rows, size) @ lattice.transpose(1, 0, 2).reshape(rows, -1))
        lattice = lattice.reshape(size, b, cols).transpose(1, 0, 2)
    if cols != size:
        lattice = lattice.reshape(-1, cols) @ _stretch(cols, size).T
    return lattice.reshape(b, 1, size, size)


def _texture(kind: str, rng: np.random.Generator, b: int, size: int) -> np.ndarray:
    if kind == "brushed":  # independent rows, smooth along x: streaks like brushed metal
        streaks = _noise_field(rng, b, size, size, max(2, size // 10))
        return streaks + 0.3 * _noise_field(rng, b, size, size, size)
    grain = _noise_field(rng, b, size, max(2, size // 2), max(2, size // 2))
    return grain + 0.5 * _noise_field(rng, b, size, max(2, size // 8), max(2, size // 8))


def _colours(rgb: tuple[float, float, float], rng: np.random.Generator, b: int) -> np.ndarray:
    """(B, 3, 1, 1) colours: the style's colour with its brightness and tint varied per image."""
    base = np.array(rgb) * rng.uniform(0.85, 1.15, (b, 1)) * rng.normal(1, 0.04, (b, 3))
    return base.astype(np.float32)[:, :, None, None]


def _blur(images: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Gaussian blur of (B, C, H, W) with a sigma per image: a product with a banded matrix
    on each side."""
    size = images.shape[-1]
    idx = np.arange(size, dtype=np.float32)
    sig = np.maximum(sigma, 1e-3).astype(np.float32)[:, None, None, None]
    kernel = np.exp(-((idx[:, None] - idx[None, :]) ** 2) / (2 * sig**2))
    kernel /= kernel.sum(axis=-1, keepdims=True)  # rows sum to 1: edges are not darkened
    return kernel @ images @ kernel.transpose(0, 1, 3, 2)


def _per_image(values) -> np.ndarray:
    """(B,) -> (B, 1, 1, 1), to broadcast over channels and pixels."""
    return np.asarray(values, np.float32)[:, None, None, None]


@dataclass
class _Canvas:
    """A batch being painted: pixel coordinates, the housing's frame, and the nuisances drawn for it."""

    grid: np.ndarray  # pixel centres: pixel j covers [j, j+1)
    dx: np.ndarray  # image x, y relative to the seat centre
    dy: np.ndarray
    u: np.ndarray  # the housing's frame
    v: np.ndarray
    unit: np.ndarray
    grain: np.ndarray
    metal_grain: np.ndarray
    blotch: np.ndarray
    colours: tuple[np.ndarray, ...]  # background, housing, floor, metal
    lu: np.ndarray  # the light's direction: where shadows fall, which side of the part shines
    lv: np.ndarray
    drop: np.ndarray  # shadow length


def render(sc: Scenes, size: int, look: Look, rng: np.random.Generator) -> np.ndarray:
    """(B, size, size, 3) uint8 images of the scenes, with the look's nuisances drawn from rng."""
    canvas = _canvas(sc, size, look, rng)
    img = _paint_housing(sc, look, canvas)
    img = _paint_part(sc, look, canvas, img, rng)
    return _light_and_sensor(look, canvas, img, size, rng)


# Defects no training sees: for measuring how a line's model meets what nobody labelled.
NOVEL_DEFECTS = ("scratch", "empty", "foreign", "chipped", "second")


def render_novel(sc: Scenes, kinds: list[str], size: int, look: Look,
                 rng: np.random.Generator) -> tuple[np.ndarray, list[list[float]]]:
    """Images of seated parts, each with a defect of its kind (NOVEL_DEFECTS), and each defect's box.

    scratch: a thin line across the part's metal; empty: the seat without its part; foreign: a
    small dark or bright object on the part or in the seat; chipped: a corner of the part broken
    off; second: another part lying across the housing beside the seat.
    """
    canvas = _canvas(sc, size, look, rng)
    # The defects draw from a stream of their own: the scene's light and noise stay as without them.
    defect_rng = np.random.default_rng(rng.integers(2**63))
    img = _paint_housing(sc, look, canvas)
    kinds_arr = np.array(kinds)
    present = kinds_arr != "empty"
    if present.any():  # the empty seats keep the housing alone
        img = np.where(_per_image(present) > 0, _paint_part(sc, look, canvas, img.copy(), rng), img)
    masks = np.zeros((len(kinds), 1, size, size), np.float32)
    masks[~present] = _cover(_sdf_box(canvas.u, canvas.v, 0, 0, _per_image(sc.seat[:, 0]),
                                      _per_image(sc.seat[:, 1]), look.seat_round * canvas.unit))[~present]
    for kind, paint in (("scratch", _scratch), ("foreign", _foreign), ("chipped", _chipped), ("second", _second)):
        chosen = kinds_arr == kind
        if chosen.any():
            img, masks = paint(sc, look, canvas, img, masks, chosen, defect_rng)
    boxes = [_mask_box(m[0]) for m in masks]
    return _light_and_sensor(look, canvas, img, size, rng), boxes


def _mask_box(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask > 0.5)
    if len(rows) == 0:
        rows, cols = np.nonzero(mask > 0)
    if len(rows) == 0:
        return [0.0, 0.0, float(mask.shape[1]), float(mask.shape[0])]
    return [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]


def _part_shape(sc: Scenes, look: Look, c: _Canvas) -> tuple[np.ndarray, ...]:
    ou, ov = _per_image(sc.offset[:, 0]), _per_image(sc.offset[:, 1])
    pu, pv = _per_image(sc.part[:, 0]), _per_image(sc.part[:, 1])
    outer = _cover(_sdf_box(c.u, c.v, ou, ov, pu, pv, look.part_round * c.unit))
    hole = _cover(_sdf_box(c.u, c.v, ou, ov, pu * look.hole[0], pv * look.hole[1], look.hole_round * c.unit))
    return ou, ov, pu, pv, outer * (1 - hole)


def _scratch(sc, look, c, img, masks, chosen, rng):
    """A line one to two pixels wide (at 64 px) across the part's metal, brighter or darker than it."""
    b = len(img)
    ou, ov, pu, pv, metal = _part_shape(sc, look, c)
    angle = _per_image(rng.uniform(0, np.pi, b))
    au, av = np.cos(angle), np.sin(angle)
    cu = ou + pu * _per_image(rng.uniform(-0.4, 0.4, b))
    cv = ov + pv * _per_image(rng.uniform(-0.4, 0.4, b))
    along = (c.u - cu) * au + (c.v - cv) * av
    across = -(c.u - cu) * av + (c.v - cv) * au
    half = pu * _per_image(rng.uniform(0.6, 1.0, b))
    width = c.unit * _per_image(rng.uniform(0.6, 1.1, b))
    line = _cover(np.maximum(np.abs(across) - width, np.abs(along) - half)) * metal
    tone = _per_image(np.where(rng.uniform(size=b) < 0.5, 0.25, 1.6))
    return _apply(img, masks, chosen, line, img * tone)


def _foreign(sc, look, c, img, masks, chosen, rng):
    """A small object (a screw head, a chip of plastic) on the part or in the seat, with its shadow."""
    b = len(img)
    su, sv = _per_image(sc.seat[:, 0]), _per_image(sc.seat[:, 1])
    cu, cv = su * _per_image(rng.uniform(-0.7, 0.7, b)), sv * _per_image(rng.uniform(-0.7, 0.7, b))
    radius = c.unit * _per_image(rng.uniform(1.5, 3.0, b))
    stretch = _per_image(rng.uniform(0.6, 1.0, b))
    distance = np.sqrt(((c.u - cu) / stretch) ** 2 + (c.v - cv) ** 2) - radius
    blob = _cover(distance)
    img = img * (1 - 0.4 * _per_image(chosen) * _cover(np.sqrt(((c.u - cu - c.drop * c.lu) / stretch) ** 2
                                                                + (c.v - cv - c.drop * c.lv) ** 2) - radius,
                                                        2 * c.unit))
    colour = np.where(rng.uniform(size=(b, 1, 1, 1)) < 0.5, rng.uniform(0.03, 0.15, (b, 3, 1, 1)),
                      rng.uniform(0.75, 0.95, (b, 3, 1, 1))).astype(np.float32)
    return _apply(img, masks, chosen, blob, colour * (1 + 0.1 * c.grain))


def _chipped(sc, look, c, img, masks, chosen, rng):
    """A corner of the part broken off: the seat's floor shows where the metal was."""
    b = len(img)
    ou, ov, pu, pv, metal = _part_shape(sc, look, c)
    corner_u = ou + pu * _per_image(rng.choice([-1.0, 1.0], b))
    corner_v = ov + pv * _per_image(rng.choice([-1.0, 1.0], b))
    reach = c.unit * _per_image(rng.uniform(4.0, 7.0, b))
    gone = _cover(np.abs(c.u - corner_u) + np.abs(c.v - corner_v) - reach) * metal
    floor = c.colours[2] * (1 + 0.05 * c.grain)
    return _apply(img, masks, chosen, gone, floor)


def _second(sc, look, c, img, masks, chosen, rng):
    """Another part lying across the housing beside the seat, turned and with its own shadow."""
    b = len(img)
    pu, pv = _per_image(sc.part[:, 0]), _per_image(sc.part[:, 1])
    side = _per_image(rng.choice([-1.0, 1.0], b))
    hu = _per_image(sc.housing[:, 0])
    cu = side * (hu - pu * _per_image(rng.uniform(0.2, 0.6, b)))
    cv = _per_image(sc.housing[:, 1]) * _per_image(rng.uniform(-0.4, 0.4, b))
    turn = _per_image(rng.uniform(0.3, 1.2, b))
    du, dv = c.u - cu, c.v - cv
    ru, rv = np.cos(turn) * du + np.sin(turn) * dv, -np.sin(turn) * du + np.cos(turn) * dv
    outer = _cover(_sdf_box(ru, rv, 0, 0, pu, pv, look.part_round * c.unit))
    hole = _cover(_sdf_box(ru, rv, 0, 0, pu * look.hole[0], pv * look.hole[1], look.hole_round * c.unit))
    part = outer * (1 - hole)
    metal = c.colours[3] * (0.8 + 0.05 * c.metal_grain)
    return _apply(img, masks, chosen, part, metal)


def _apply(img: np.ndarray, masks: np.ndarray, chosen: np.ndarray, cover: np.ndarray,
           paint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paint `paint` over `img` where `cover` is, for the chosen scenes; their masks are the cover."""
    weight = cover * _per_image(chosen)
    img = img + weight * (paint - img)
    masks = np.where(_per_image(chosen) > 0, np.maximum(masks, cover), masks)
    return img, masks


def _canvas(sc: Scenes, size: int, look: Look, rng: np.random.Generator) -> _Canvas:
    b = len(sc.angle)
    grid = np.arange(size, dtype=np.float32) + 0.5
    dx = grid[None, None, None, :] - _per_image(sc.centre[:, 0])
    dy = grid[None, None, :, None] - _per_image(sc.centre[:, 1])
    cos, sin = _per_image(np.cos(sc.angle)), _per_image(np.sin(sc.angle))
    unit = _per_image(sc.unit)
    grain = _texture(look.texture, rng, b, size)
    metal_grain = _texture(look.texture, rng, b, size)
    blotch = _noise_field(rng, b, size, 4, 4)
    colours = tuple(_colours(rgb, rng, b) for rgb in (look.background, look.housing, look.floor, look.metal))
    light = rng.uniform(0, 2 * np.pi, b)
    drop = _per_image(rng.uniform(0.5, 1.2, b)) * unit
    return _Canvas(grid, dx, dy, cos * dx + sin * dy, -sin * dx + cos * dy, unit, grain, metal_grain, blotch,
                   colours, _per_image(np.cos(light)), _per_image(np.sin(light)), drop)


def _paint_housing(sc: Scenes, look: Look, c: _Canvas) -> np.ndarray:
    """The plate, the housing with its shadow, and the seat's floor with a lit bevel along its wall."""
    background, housing, floor, _ = c.colours
    u, v, unit = c.u, c.v, c.unit
    img = background * (1 + 0.08 * c.grain + 0.06 * c.blotch)
    hu, hv, hr = _per_image(sc.housing[:, 0]), _per_image(sc.housing[:, 1]), look.housing_round * unit
    housing_shadow = _cover(_sdf_box(u - 2 * c.drop * c.lu, v - 2 * c.drop * c.lv, 0, 0, hu, hv, hr), 3 * unit)
    img *= 1 - 0.4 * housing_shadow
    img += _cover(_sdf_box(u, v, 0, 0, hu, hv, hr)) * (housing * (1 + 0.05 * c.grain + 0.05 * c.blotch) - img)
    seat = _sdf_box(u, v, 0, 0, _per_image(sc.seat[:, 0]), _per_image(sc.seat[:, 1]), look.seat_round * unit)
    inside_seat = _cover(seat)
    img += inside_seat * (floor * (1 + 0.05 * c.grain) - img)
    img += 0.18 * (inside_seat - _cover(seat + unit))  # a lit bevel along the seat wall outlines the seat
    return img


def _paint_part(sc: Scenes, look: Look, c: _Canvas, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The part's shadow, then its metal: brighter towards the light, a specular band, its own grain."""
    b = len(sc.angle)
    metal = c.colours[3]
    ou, ov = _per_image(sc.offset[:, 0]), _per_image(sc.offset[:, 1])
    pu, pv = _per_image(sc.part[:, 0]), _per_image(sc.part[:, 1])
    hole_u, hole_v = pu * look.hole[0], pv * look.hole[1]

    def part_cover(su: np.ndarray, sv: np.ndarray, width: float | np.ndarray = 1.0) -> np.ndarray:
        outer = _sdf_box(su, sv, ou, ov, pu, pv, look.part_round * c.unit)
        hole = _sdf_box(su, sv, ou, ov, hole_u, hole_v, look.hole_round * c.unit)
        return _cover(outer, width) * (1 - _cover(hole, width))

    img *= 1 - 0.45 * part_cover(c.u - c.drop * c.lu, c.v - c.drop * c.lv, 2 * c.unit)
    across = ((c.u - ou) * c.lu + (c.v - ov) * c.lv) / pu
    glint = rng.uniform(0, np.pi, b)
    band = ((c.u - ou) * _per_image(np.cos(glint)) + (c.v - ov) * _per_image(np.sin(glint))) / pu
    band = (band - _per_image(rng.uniform(-0.6, 0.6, b))) / _per_image(rng.uniform(0.15, 0.4, b))
    shine = 0.78 + 0.15 * across + 0.3 * _per_image(rng.uniform(0, 1, b)) * np.exp(-band * band) + 0.05 * c.metal_grain
    img += part_cover(c.u, c.v) * (metal * shine - img)
    return img


def _light_and_sensor(look: Look, c: _Canvas, img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Uneven light (a gradient or a spot), exposure, lens blur and sensor noise; to uint8 HWC."""
    b = len(img)
    if look.light == "gradient":
        tilt = rng.uniform(0, 2 * np.pi, b)
        ramp = (c.dx * _per_image(np.cos(tilt)) + c.dy * _per_image(np.sin(tilt))) / size
        img *= 1 + _per_image(rng.uniform(0, 0.6, b)) * ramp
    else:
        spot = size / 2 + rng.normal(0, 0.15 * size, (b, 2))
        sx = c.grid[None, None, None, :] - _per_image(spot[:, 0])
        sy = c.grid[None, None, :, None] - _per_image(spot[:, 1])
        reach = _per_image(rng.uniform(0.35, 0.7, b)) * size
        img *= 0.45 + 0.75 * np.exp(-(sx * sx + sy * sy) / (2 * reach * reach))

    contrast, brightness = _per_image(rng.uniform(0.8, 1.2, b)), _per_image(rng.uniform(-0.08, 0.08, b))
    img = (img - 0.5) * contrast + 0.5 + brightness
    img = _blur(img, rng.uniform(*look.blur_px, b) * (size / 64))

    pixel_noise = rng.standard_normal(img.shape, dtype=np.float32)
    if look.noise == "gaussian":
        img += pixel_noise * _per_image(rng.uniform(0.005, 0.035, b))
    else:  # photon noise grows with the signal; a line sensor adds a level per row
        img += pixel_noise * np.sqrt(np.clip(img, 0, None)) * _per_image(rng.uniform(0.02, 0.06, b))
        img += rng.standard_normal((b, 1, size, 1), dtype=np.float32) * _per_image(rng.uniform(0, 0.025, b))
    img = np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return np.ascontiguousarray(img.transpose(0, 2, 3, 1))
