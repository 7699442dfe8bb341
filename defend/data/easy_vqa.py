"""easy-vqa (PyPI ``easy-vqa``): its questions as VQA samples, and one short caption per image derived
from its question-answer pairs ("a red circle")."""
from __future__ import annotations

from defend.data.samples import DataError, Sample

EASY_VQA_COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
CAPTION_PROMPT = "describe the image."


def easy_vqa_question_type(question: str) -> str:
    """``color``, ``shape`` or ``yes/no``: the breakdown the demo table reports."""
    if not question.startswith("what"):
        return "yes/no"
    return "color" if "color" in question.split() else "shape"  # "what is the color of the circle?"


def _easy_vqa_rows(split: str) -> tuple[list[str], list[str], list[int], dict[int, str]]:
    import easy_vqa

    if split not in ("train", "test"):
        raise DataError(f"dataset.split: easy_vqa has splits 'train' and 'test', got '{split}'.")
    if split == "train":
        texts, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        texts, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    return texts, answers, ids, paths


def load_easy_vqa(split: str) -> list[Sample]:
    texts, answers, ids, paths = _easy_vqa_rows(split)
    return [
        Sample(
            id=f"{split}-{n}",
            image=paths[image_id],
            prompt=question,
            response=answer,
            source=f"easy_vqa/{split}",
            meta={"question_type": easy_vqa_question_type(question), "image_id": image_id},
        )
        for n, (question, answer, image_id) in enumerate(zip(texts, answers, ids))
    ]


def easy_vqa_image_attributes(split: str) -> dict[int, dict[str, str]]:
    """Each image's colour and shape, read off its question/answer pairs.

    Direct answers name an attribute; yes/no answers confirm one or rule one out, and an
    attribute is known once all but one value are ruled out.
    """
    texts, answers, ids, _ = _easy_vqa_rows(split)
    present: dict[int, dict[str, str]] = {}
    absent: dict[int, set[str]] = {}
    for question, answer, image_id in zip(texts, answers, ids):
        found = present.setdefault(image_id, {})
        kind = easy_vqa_question_type(question)
        words = question.rstrip("?").split()
        named = [w for w in words if w in EASY_VQA_COLORS + EASY_VQA_SHAPES]
        if kind == "color":
            found["color"] = answer
        elif kind == "shape":
            found["shape"] = answer
            found.update({"color": w for w in named})
        elif (answer == "yes") != ("not" in words or "no" in words):
            found.update({("color" if w in EASY_VQA_COLORS else "shape"): w for w in named})
        else:
            absent.setdefault(image_id, set()).update(named)
    for image_id, found in present.items():
        for attr, values in (("color", EASY_VQA_COLORS), ("shape", EASY_VQA_SHAPES)):
            left = [v for v in values if v not in absent.get(image_id, set())]
            if attr not in found and len(left) == 1:
                found[attr] = left[0]
    return present


def load_easy_vqa_captions(split: str) -> list[Sample]:
    _, _, _, paths = _easy_vqa_rows(split)
    samples = []
    for image_id, found in sorted(easy_vqa_image_attributes(split).items()):
        if "color" in found and "shape" in found:
            samples.append(
                Sample(
                    id=f"{split}-img{image_id}",
                    image=paths[image_id],
                    prompt=CAPTION_PROMPT,
                    response=f"a {found['color']} {found['shape']}",
                    source=f"easy_vqa_captions/{split}",
                    meta={"image_id": image_id},
                )
            )
    return samples
