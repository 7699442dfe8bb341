"""``easy_vqa_scenes``: a several-word caption per easy-vqa image (issue 20).

"a small red circle in the top left", "a large teal rectangle in the center", "a medium gray
triangle at the bottom": size, colour, shape and position of the image's one shape.

What the QA pairs say (colour, shape; :func:`easy_vqa_image_attributes`) is taken from them; the
rest is read off the pixels. easy-vqa draws one palette-coloured shape on a uniform background
(each channel in 230..255) at 128x128 and downsamples to 64x64 bilinearly (easy-VQA's
``gen_data/images.py``), so every pixel is ``bg + alpha * (fg - bg)`` with ``alpha`` the shape's
coverage (measured: no pixel of the 5000 images is more than 1.04 off that line):

- background: the per-channel median of the 252 border pixels (a shape is at most half the image
  wide and high, so it never covers half the border);
- foreground: the pixel farthest from the background, snapped to the easy-vqa palette (an exact
  palette colour in all 5000 images: the anti-aliased edge never reaches farther than the inside);
- coverage ``alpha`` per pixel: its projection onto the background->foreground line, clipped to [0, 1];
  ``area`` = sum of alpha (pixels of a 64x64 image), centroid = alpha-weighted mean pixel centre;
- size: ``small`` / ``medium`` / ``large`` by area, cut at the train split's terciles
  (:data:`SIZE_THRESHOLDS`);
- position: the cell of a 3x3 grid holding the centroid (:data:`POSITIONS`);
- colour and shape where the QA pairs do not tell them (7% of images lack the colour, 9% the
  shape): the palette colour, and the shape by how much of its (soft) bounding box it fills
  (rectangle 1, circle pi/4, triangle 1/2; :data:`SHAPE_FILL_CUTS`). Both agree with the QA pairs on
  every image where those tell them (tests/data/test_scene_captions.py).

Loading a split reads and measures every image once per process, in batches of 250 (on one CPU
core: train, 4000 images, 1.2-1.9 s; test, 1000 images, 0.4 s; again: 0.05 s), and keeps the result
(``functools.cache``).
"""
from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image

from defend.data.easy_vqa import CAPTION_PROMPT, _easy_vqa_rows, easy_vqa_image_attributes
from defend.data.samples import DataError, Sample

# easy-vqa's palette, in EASY_VQA_COLORS' order: measured, the inside of every train and test shape
# whose colour the QA pairs name is exactly that colour's value here
PALETTE = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
    "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0),
}

# Foreground area (sum of coverage, in pixels of the 64x64 image) at the train split's terciles:
# np.percentile(areas, [100/3, 200/3]) over its 4000 images gave 203.95 and 402.16 (min 33.7, max
# 1055.9); rounded. small: area < 204, medium: 204 <= area < 402, large: area >= 402.
SIZE_THRESHOLDS = (204.0, 402.0)
SIZES = ("small", "medium", "large")

# 3x3 grid over the 64x64 image, rows top to bottom; a centroid on a cell border goes to the later cell
POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
PHRASES = {"top left": "in the top left", "top": "at the top", "top right": "in the top right",
           "left": "on the left", "center": "in the center", "right": "on the right",
           "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right"}

# area / (soft width * soft height): triangle below the first cut, circle between, rectangle above.
# Measured on the 4533 train + test images whose QA pairs name the shape: triangle 0.525-0.631,
# circle 0.787-0.867 (pi/4 and more for small ones, whose blurred edge fills the box's corners),
# rectangle 1.000; the cuts sit halfway between.
SHAPE_FILL_CUTS = (0.71, 0.93)

IMAGE_SIZE = 64


def caption(size: str, color: str, shape: str, position: str) -> str:
    return f"a {size} {color} {shape} {PHRASES[position]}"


def measure_images(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Per image of a batch (N x H x W x 3, uint8) of easy-vqa images: the palette colour of its shape
    (``color``, an index into :data:`PALETTE`; ``color_offset``, the largest channel difference of its
    farthest pixel from that colour), coverage ``area`` (pixels), centroid ``cx``, ``cy`` (pixels from
    the left/top edge) and ``fill`` (area / (soft width * soft height))."""
    a = pixels.transpose(0, 3, 1, 2).astype(np.float32)  # N x 3 x H x W: one plane per channel
    n, _, height, width = a.shape
    border = np.concatenate([a[:, :, 0], a[:, :, -1], a[:, :, 1:-1, 0], a[:, :, 1:-1, -1]], axis=2)
    bg = np.round(np.median(border, axis=2))  # (N, 3)
    diff = a - bg[:, :, None, None]
    dist = np.einsum("nchw,nchw->nhw", diff, diff).reshape(n, -1)  # (einsum: sum(1) over 3 planes is 4x slower)
    far = a.reshape(n, 3, -1)[np.arange(n), :, dist.argmax(1)]  # (N, 3)
    rgb = np.array(list(PALETTE.values()), dtype=np.float32)
    off = np.abs(far[:, None, :] - rgb[None]).max(-1)  # (N, colours)
    color = off.argmin(1)
    d = rgb[color] - bg  # (N, 3)
    alpha = np.clip(np.einsum("nchw,nc->nhw", diff, d / (d * d).sum(1, keepdims=True)), 0.0, 1.0)  # (N, H, W)
    rows, cols = alpha.sum(2), alpha.sum(1)  # (N, H), (N, W)
    area = rows.sum(1)
    cy = (rows * (np.arange(height) + 0.5)).sum(1) / area
    cx = (cols * (np.arange(width) + 0.5)).sum(1) / area
    fill = area / (alpha.max(1).sum(1) * alpha.max(2).sum(1))
    return {"color": color, "color_offset": off.min(1), "area": area, "cx": cx, "cy": cy, "fill": fill}


def size_class(area: float) -> str:
    return SIZES[int(np.searchsorted(SIZE_THRESHOLDS, area, side="right"))]


def position_class(cx: float, cy: float, image_size: int = IMAGE_SIZE) -> str:
    col = min(int(cx * 3 // image_size), 2)
    row = min(int(cy * 3 // image_size), 2)
    return POSITIONS[row][col]


def shape_from_fill(fill: float) -> str:
    low, high = SHAPE_FILL_CUTS
    return "triangle" if fill < low else ("circle" if fill < high else "rectangle")


def _read_pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


@cache
def scene_attributes(split: str) -> dict[int, dict]:
    """``{image_id: {size, position, color, shape, area, ...}}`` for every image of the split, in id order.

    ``color`` and ``shape`` are the QA pairs' where they tell them, else the pixels'
    (``from_pixels`` names which); ``pixel_color`` and ``pixel_shape`` are always the pixels'."""
    _, _, _, paths = _easy_vqa_rows(split)
    known = easy_vqa_image_attributes(split)
    ids = sorted(paths)
    names = list(PALETTE)
    scenes = {}
    for start in range(0, len(ids), 250):
        chunk = ids[start:start + 250]
        pixels = np.stack([_read_pixels(paths[i]) for i in chunk])
        if pixels.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise DataError(f"easy_vqa_scenes/{split}: images are {pixels.shape[1:3]}, not {IMAGE_SIZE}x{IMAGE_SIZE}.")
        m = measure_images(pixels)
        for k, image_id in enumerate(chunk):
            area, cx, cy, fill = (float(m[key][k]) for key in ("area", "cx", "cy", "fill"))
            pixel_color, pixel_shape = names[int(m["color"][k])], shape_from_fill(fill)
            qa = known.get(image_id, {})
            scenes[image_id] = {
                "size": size_class(area),
                "position": position_class(cx, cy),
                "color": qa.get("color", pixel_color),
                "shape": qa.get("shape", pixel_shape),
                "from_pixels": " ".join(attr for attr in ("color", "shape") if attr not in qa),
                "pixel_color": pixel_color,
                "pixel_shape": pixel_shape,
                "color_offset": float(m["color_offset"][k]),
                "area": round(area, 1),
                "cx": round(cx, 2),
                "cy": round(cy, 2),
                "fill": round(fill, 3),
            }
    return scenes


def load_easy_vqa_scenes(split: str) -> list[Sample]:
    _, _, _, paths = _easy_vqa_rows(split)
    samples = []
    for image_id, s in scene_attributes(split).items():
        samples.append(
            Sample(
                id=f"{split}-scene{image_id}",
                image=paths[image_id],
                prompt=CAPTION_PROMPT,
                response=caption(s["size"], s["color"], s["shape"], s["position"]),
                source=f"easy_vqa_scenes/{split}",
                meta={"image_id": image_id, "size": s["size"], "position": s["position"], "color": s["color"],
                      "shape": s["shape"], "area": s["area"]},
            )
        )
    return samples
