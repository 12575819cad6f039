"""The procedural dataset and the pixel-statistic reader agree on every rendered scene."""

import random

from engine.models.shapes.components import build_tokenizer
from engine.models.shapes.dataset import (
    COLORS,
    HELD_OUT,
    SHAPES,
    Scene,
    caption,
    held_out_scenes,
    is_held_out,
    random_scene,
    render,
)
from engine.models.shapes.evaluate import read_image, score


def test_the_reader_reads_rendered_scenes_exactly():
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(150)]
    result = score(scenes, [render(s, rng) for s in scenes])
    assert (result.color_accuracy, result.background_accuracy, result.shape_accuracy) == (1.0, 1.0, 1.0)


def test_a_blank_image_has_no_object_and_scores_zero():
    blank = render(Scene("red", "circle", "blue", size="small")).resize((1, 1)).resize((64, 64))
    reading = read_image(blank)
    assert reading.color is None and reading.shape is None


def test_held_out_combinations_never_train_and_every_word_still_does():
    rng = random.Random(1)
    train = [random_scene(rng) for _ in range(2000)]
    assert not any(is_held_out(s) for s in train)
    assert {s.color for s in train} == set(COLORS) and {s.shape for s in train} == set(SHAPES)
    assert {s.background for s in train} == set(COLORS)
    assert len(HELD_OUT) == len(COLORS) * len(SHAPES)
    held = held_out_scenes(48)
    assert len(held) == 48 and all(is_held_out(s) for s in held)


def test_captions_name_what_varies_and_tokenize_into_words():
    scene = Scene("orange", "triangle", "black", size="large", position="top left")
    text = caption(scene)
    assert text == "a large orange triangle at the top left on a black background"
    assert caption(Scene("orange", "circle", "white"), 1) == "an orange circle on white"
    assert caption(Scene("red", "square", "orange")) == "a red square on an orange background"
    tokenizer = build_tokenizer()
    assert tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)[:-1] == ["▁" + w for w in text.split()]
