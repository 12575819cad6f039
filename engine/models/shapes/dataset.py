"""The procedural captioned shapes dataset: one flat shape on a plain background, drawn with PIL.

A caption names everything that varies, so an image is (up to a pixel or two of jitter) a
function of its caption: an unnamed size is medium and an unnamed position is the center.
That keeps the problem small enough to learn on a CPU. A fixed set of (colour, shape,
background) combinations never appears in training; it measures generalisation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down, so edges are anti-aliased

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")  # no size word: medium
POSITIONS = ("left", "right", "top", "bottom", "center",
             "top left", "top right", "bottom left", "bottom right")  # none: center

# Half-extent of the shape in pixels of the 64-px image.
RADIUS = {"small": 9, None: 14, "large": 20}
MARGIN = 4
JITTER = 2

POSITION_PHRASES = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
    "center": "in the center", "top left": "at the top left", "top right": "at the top right",
    "bottom left": "at the bottom left", "bottom right": "at the bottom right",
}
BACKGROUND_TEMPLATES = ("on {a} {bg} background", "on {bg}", "on {a} {bg} background", ", {bg} background")

# Words the tokenizer gives their own pieces.
VOCABULARY = sorted({"a", "an", "on", "at", "the", "in", "background", *COLORS, *SHAPES, *SIZES,
                     "left", "right", "top", "bottom", "center"})


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    background: str
    size: str | None = None
    position: str | None = None


def _held_out_backgrounds() -> dict[tuple[str, str], str]:
    """One background per (colour, shape) pair, so every colour, shape and background still trains."""
    held: dict[tuple[str, str], str] = {}
    for i, color in enumerate(COLORS):
        for j, shape in enumerate(SHAPES):
            k = (i + 3 * j + 1) % len(COLORS)
            if COLORS[k] == color:
                k = (k + 1) % len(COLORS)
            held[(color, shape)] = COLORS[k]
    return held


HELD_OUT = _held_out_backgrounds()


def is_held_out(scene: Scene) -> bool:
    return HELD_OUT[(scene.color, scene.shape)] == scene.background


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, template: int = 0) -> str:
    words = [w for w in (scene.size, scene.color, scene.shape) if w]
    text = " ".join([_article(words[0]), *words])
    if scene.position:
        text += " " + POSITION_PHRASES[scene.position]
    tail = BACKGROUND_TEMPLATES[template % len(BACKGROUND_TEMPLATES)].format(
        a=_article(scene.background), bg=scene.background)
    return text + ("" if tail.startswith(",") else " ") + tail


def random_scene(rng: random.Random, held_out: bool = False) -> Scene:
    """A scene from the training split, or (held_out=True) from the held-out combinations."""
    while True:
        color, shape = rng.choice(COLORS), rng.choice(SHAPES)
        if held_out:
            background = HELD_OUT[(color, shape)]
        else:
            background = rng.choice([c for c in COLORS if c != color])
        # Half the scenes name no size and half no position, so the core task (colour, shape,
        # background) gets most of the examples.
        scene = Scene(color, shape, background,
                      size=rng.choice((None,) * len(SIZES) + SIZES),
                      position=rng.choice((None,) * len(POSITIONS) + POSITIONS))
        if is_held_out(scene) == held_out:
            return scene


def _center(scene: Scene, radius: int) -> tuple[float, float]:
    low, mid, high = MARGIN + radius, IMAGE_SIZE / 2, IMAGE_SIZE - MARGIN - radius
    position = scene.position or "center"
    x = low if "left" in position else high if "right" in position else mid
    y = low if "top" in position else high if "bottom" in position else mid
    return x, y


def render(scene: Scene, rng: random.Random | None = None) -> Image.Image:
    """Draw the scene; rng adds up to JITTER pixels of position and size variation."""
    radius = RADIUS[scene.size]
    x, y = _center(scene, radius)
    if rng is not None:
        x += rng.uniform(-JITTER, JITTER)
        y += rng.uniform(-JITTER, JITTER)
        radius += rng.uniform(-1, 1)
    s = SUPERSAMPLE
    big = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), PALETTE[scene.background])
    draw = ImageDraw.Draw(big)
    fill = PALETTE[scene.color]
    x, y, r = x * s, y * s, radius * s
    if scene.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif scene.shape == "square":
        h = 0.9 * r  # about the circle's area, so size does not give the shape away
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    else:
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def to_tensor_array(image: Image.Image) -> np.ndarray:
    """HWC uint8 -> CHW float32 in [-1, 1], the VAE's input range."""
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def held_out_scenes(count: int = 48) -> list[Scene]:
    """A fixed list of held-out scenes: every held-out combination, plain and with size/position words."""
    rng = random.Random(1234)
    scenes: list[Scene] = []
    combos = sorted(HELD_OUT.items())
    variant = 0
    while len(scenes) < count:
        for (color, shape), background in combos:
            if len(scenes) >= count:
                break
            if variant == 0:
                scenes.append(Scene(color, shape, background))
            else:
                scenes.append(Scene(color, shape, background, size=rng.choice((None, *SIZES)),
                                    position=rng.choice(POSITIONS)))
        variant += 1
    return scenes
