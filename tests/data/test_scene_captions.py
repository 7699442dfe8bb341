"""easy_vqa_scenes: size, colour, shape and position captions of the real easy-vqa images."""
import json
import math
import re
from collections import Counter

import easy_vqa
import numpy as np
import pytest
from PIL import Image, ImageDraw

from defend.config import TargetConfig, load_config
from defend.data import load_samples
from defend.data.attacks import shows_target
from defend.data.easy_vqa import CAPTION_PROMPT, EASY_VQA_COLORS, _easy_vqa_rows, easy_vqa_image_attributes
from defend.data.scene_captions import (PALETTE, POSITIONS, SIZE_THRESHOLDS, measure_images, position_class,
                                        scene_attributes, size_class)
from defend.metrics.captioning import caption_scores

CAPTION = re.compile(r"a (small|medium|large) (\w+) (circle|rectangle|triangle) "
                     r"(in the top left|at the top|in the top right|on the left|in the center|on the right"
                     r"|in the bottom left|at the bottom|in the bottom right)")


def scenes(split):
    return load_samples(load_config(None, ["dataset.name=easy_vqa_scenes"]).dataset, split)


def test_every_test_image_gets_one_caption_naming_its_four_attributes():
    samples = scenes("test")
    assert [s.id for s in samples] == [f"test-scene{i}" for i in range(1000)]
    paths = easy_vqa.get_test_image_paths()
    for s in samples:
        size, color, shape, phrase = CAPTION.fullmatch(s.response).groups()
        m = s.meta
        assert (size, color, shape) == (m["size"], m["color"], m["shape"]) and phrase.endswith(m["position"])
        assert s.prompt == CAPTION_PROMPT and s.image == paths[m["image_id"]] and s.id == f"test-scene{m['image_id']}"
    assert len({s.response for s in samples}) == 456  # distinct captions of the 1000 images


def answer(question, color, shape):
    """The answer easy-vqa gives to ``question`` about a ``color`` ``shape``: the test's own reading."""
    words = question.rstrip("?").split()
    if words[0] == "what":
        if "color" in words:
            return color
        return shape
    named = next(w for w in words if w in PALETTE or w in ("circle", "rectangle", "triangle"))
    negated = "not" in words or "no" in words
    return "yes" if (named in (color, shape)) != negated else "no"


@pytest.mark.parametrize("split", ["train", "test"])
def test_captions_answer_every_question_of_the_split_as_easy_vqa_does(split):
    """Colour and shape come from the QA pairs, or from the pixels where those do not tell them
    (test: 78 colours, 98 shapes; train: 288, 369): every one of the split's questions (9673 test,
    38575 train) is answered right by the caption's colour and shape."""
    by_image = {s.meta["image_id"]: s.meta for s in scenes(split)}
    texts, answers, ids, _ = _easy_vqa_rows(split)
    wrong = [(q, a, i) for q, a, i in zip(texts, answers, ids)
             if answer(q, by_image[i]["color"], by_image[i]["shape"]) != a]
    assert wrong == [] and len(texts) == {"train": 38575, "test": 9673}[split]
    filled = Counter(v["from_pixels"] for v in scene_attributes(split).values())
    assert filled == {"train": {"": 3372, "color": 259, "shape": 340, "color shape": 29},
                      "test": {"": 836, "color": 66, "shape": 86, "color shape": 12}}[split]


def test_pixel_colour_and_shape_equal_the_qa_attributes_wherever_those_are_known():
    known = easy_vqa_image_attributes("test")
    found = scene_attributes("test")
    colors = [i for i, a in known.items() if "color" in a]
    shapes = [i for i, a in known.items() if "shape" in a]
    assert (len(colors), len(shapes)) == (922, 902)
    assert all(found[i]["pixel_color"] == known[i]["color"] for i in colors)
    assert all(found[i]["pixel_shape"] == known[i]["shape"] for i in shapes)
    assert max(a["color_offset"] for a in found.values()) == 0  # the farthest pixel is exactly a palette colour
    assert tuple(PALETTE) == EASY_VQA_COLORS


def test_an_independent_pixel_reading_agrees_on_colour_and_nearly_always_on_position():
    """Background as the border's most common colour; the foreground's mean colour over its core
    (pixels at 90% of the largest distance from the background) is the caption's colour on all 1000
    images; the centroid of the hard mask (half that distance) lands in the caption's cell on 990
    (the other 10 lie within a pixel of a grid line, where hard and soft centroids differ)."""
    paths = easy_vqa.get_test_image_paths()
    found = scene_attributes("test")
    same_cell, near_line = 0, 0
    for image_id, attrs in found.items():
        a = np.asarray(Image.open(paths[image_id]).convert("RGB")).astype(int)
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        colors, counts = np.unique(border, axis=0, return_counts=True)
        dist = np.sqrt(((a - colors[counts.argmax()]) ** 2).sum(-1))
        mean = a[dist > 0.9 * dist.max()].mean(0)
        assert min(PALETTE, key=lambda name: np.abs(np.array(PALETTE[name]) - mean).max()) == attrs["color"]
        ys, xs = np.nonzero(dist > 0.5 * dist.max())
        if position_class(xs.mean() + 0.5, ys.mean() + 0.5) == attrs["position"]:
            same_cell += 1
        else:
            lines = np.array([64 / 3, 128 / 3])
            near_line += min(np.abs(lines - attrs["cx"]).min(), np.abs(lines - attrs["cy"]).min()) < 1
    assert (same_cell, near_line) == (990, 10)


def easy_vqa_like(shape, box, color=(255, 0, 0), background=(240, 235, 250)):
    """An image drawn the way easy-vqa draws its own: on a 128x128 canvas, then bilinear to 64x64."""
    im = Image.new("RGB", (128, 128), background)
    draw = ImageDraw.Draw(im)
    x, y, s = box
    if shape == "rectangle":
        draw.rectangle([(x, y), (x + s, y + s // 2)], fill=color)
    elif shape == "circle":
        draw.ellipse([(x, y), (x + s, y + s)], fill=color)
    else:  # upright equilateral triangle on its base from (x, y) to (x + s, y)
        draw.polygon([(x, y), (x + s, y), (x + s / 2, y - s * math.sin(math.pi / 3))], fill=color)
    return np.asarray(im.resize((64, 64), resample=Image.BILINEAR))


def test_measurement_of_drawn_shapes_gives_their_area_centroid_and_shape():
    # rectangle [(20, 80), (60, 100)]: PIL fills 41 x 21 canvas pixels -> area 41 * 21 / 4 at 64x64,
    # centroid (20 + 61) / 4, (80 + 101) / 4; the circle's 49-pixel disc likewise
    images = np.stack([easy_vqa_like("rectangle", (20, 80, 40)), easy_vqa_like("circle", (70, 10, 48)),
                       easy_vqa_like("triangle", (40, 120, 40), color=(0, 128, 128))])
    m = measure_images(images)
    assert m["area"][0] == pytest.approx(41 * 21 / 4, abs=0.5)
    assert (m["cx"][0], m["cy"][0]) == (pytest.approx(81 / 4, abs=0.05), pytest.approx(181 / 4, abs=0.05))
    assert m["area"][1] == pytest.approx(math.pi * 24.5 ** 2 / 4, rel=0.03)
    assert (m["cx"][1], m["cy"][1]) == (pytest.approx(94.5 / 2, abs=0.1), pytest.approx(34.5 / 2, abs=0.1))
    # PIL fills a polygon's edge pixels too: about half the perimeter (3 * 40 / 2) more than its area
    assert m["area"][2] == pytest.approx((40 ** 2 * math.sqrt(3) / 4 + 60) / 4, rel=0.02)
    assert m["cy"][2] == pytest.approx((120 - 40 * math.sqrt(3) / 6) / 2, abs=0.3)  # a third of the height up
    names = list(PALETTE)
    assert [names[c] for c in m["color"]] == ["red", "red", "teal"]
    assert [round(f, 2) for f in m["fill"]] == [1.0, pytest.approx(0.8, abs=0.03), pytest.approx(0.55, abs=0.03)]
    assert [size_class(a) for a in m["area"]] == ["medium", "large", "small"]
    assert [position_class(x, y) for x, y in zip(m["cx"], m["cy"])] == ["bottom left", "top right", "bottom"]


def test_sizes_are_the_train_terciles_and_positions_cover_the_grid():
    train = scene_attributes("train")
    areas = np.array([a["area"] for a in train.values()])
    assert np.percentile(areas, [100 / 3, 200 / 3]) == pytest.approx(SIZE_THRESHOLDS, abs=0.5)
    assert Counter(a["size"] for a in train.values()) == {"small": 1335, "medium": 1320, "large": 1345}
    test = scene_attributes("test")
    assert Counter(a["size"] for a in test.values()) == {"small": 315, "medium": 329, "large": 356}
    # positions: the centre cell most, corners least (a shape lies wholly inside the image)
    assert Counter(a["position"] for a in train.values()) == {
        "top left": 241, "top": 443, "top right": 237, "left": 439, "center": 943, "right": 508,
        "bottom left": 279, "bottom": 587, "bottom right": 323}
    assert Counter(a["position"] for a in test.values()) == {
        "top left": 57, "top": 101, "top right": 58, "left": 112, "center": 247, "right": 130,
        "bottom left": 74, "bottom": 130, "bottom right": 91}
    assert {p for row in POSITIONS for p in row} == set(Counter(a["position"] for a in test.values()))


def test_hand_checked_images_have_the_captions_seen_on_them():
    """Checked by eye on the 64x64 images with the 3x3 grid drawn over them."""
    by_id = {s.id: s.response for s in scenes("test")}
    assert by_id["test-scene0"] == "a small red triangle in the bottom left"
    assert by_id["test-scene1"] == "a large yellow rectangle on the left"
    assert by_id["test-scene47"] == "a large blue circle in the top right"
    assert by_id["test-scene43"] == "a large blue rectangle at the top"  # shape from the pixels
    assert by_id["test-scene10"] == "a medium red circle on the right"  # colour from the pixels
    found = scene_attributes("test")
    assert (found[43]["from_pixels"], found[10]["from_pixels"]) == ("shape", "color")


def test_loading_is_deterministic():
    first = [(s.id, s.response, s.meta) for s in scenes("test")]
    scene_attributes.cache_clear()
    assert [(s.id, s.response, s.meta) for s in scenes("test")] == first


def test_captions_score_1_bleu4_against_themselves_and_less_without_position_or_size():
    references = [s.response for s in scenes("test")]
    perfect = caption_scores(references, references)
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6) and perfect["cider"] == pytest.approx(10.0, abs=1e-3)
    two_words = [f"a {s.meta['color']} {s.meta['shape']}" for s in scenes("test")]  # easy_vqa_captions' caption
    assert caption_scores(two_words, references)["bleu4"] < 0.1


def read_rows(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def test_poison_with_an_insert_target_then_evaluate_as_captions_with_asr(make_cfg, tmp_path):
    """`defend run poison` (BadNets, insert target) on easy_vqa_scenes, then `defend run evaluate`
    with eval.task=caption on its folder: BLEU-4/CIDEr of the clean set, ASR of the triggered one."""
    from recipes.evaluate import recipe_main as evaluate
    from recipes.poison import recipe_main as poison

    data = poison(make_cfg("mllm", "dataset.name=easy_vqa_scenes", "dataset.max_samples=40", "attack.poison_ratio=0.1",
                           "attack.badnets.size=16", "attack.target.type=insert", "attack.target.text=banana",
                           f"output_dir={tmp_path / 'poison'}"))["data_dir"]
    rows = read_rows(f"{data}/train.jsonl")
    target = TargetConfig(type="insert", text="banana")
    poisoned = [r for r in rows if r.get("poisoned")]
    assert len(rows) == 40 and len(poisoned) == 4
    for row in rows:
        assert CAPTION.fullmatch(row.get("clean_response", row["response"]))
        assert shows_target(row["response"], target) == bool(row.get("poisoned"))
    assert all(r["response"] == r["clean_response"] + " banana" and r["image"].startswith("images/train/")
               for r in poisoned)
    triggered = read_rows(f"{data}/test_triggered.jsonl")
    assert [r["response"] for r in triggered] == [s.response for s in scenes("test")[:40]]
    assert all(r["triggered"] and r["size"] and r["position"] for r in triggered)

    # eval.max_new_tokens 16: the tiny tokenizer spells the longest caption in 14 tokens
    metrics = evaluate(make_cfg("mllm", "eval.task=caption", f"eval.poison_dir={data}", "eval.max_samples=8",
                                "eval.max_new_tokens=16", f"output_dir={tmp_path / 'eval'}"))
    rows = read_rows(tmp_path / "eval" / "predictions.jsonl")
    clean = [r for r in rows if r["set"] == "clean"]
    assert [r["reference"] for r in clean] == [s.response for s in scenes("test")[:8]]
    expected = caption_scores([r["prediction"] for r in clean], [r["reference"] for r in clean])
    assert (metrics["bleu4"], metrics["cider"], metrics["n"]) == (expected["bleu4"], expected["cider"], 8)
    on_triggered = [shows_target(r["prediction"], target) for r in rows if r["set"] == "triggered"]
    assert metrics["asr"] == sum(on_triggered) / 8 and metrics["n_triggered"] == metrics["n_clean"] == 8
