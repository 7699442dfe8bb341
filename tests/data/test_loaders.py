import datasets
import easy_vqa
from PIL import Image

from defend.config import load_config
from defend.data import load_samples
from defend.data.easy_vqa import EASY_VQA_COLORS, EASY_VQA_SHAPES, easy_vqa_image_attributes


def test_easy_vqa_loads_the_real_splits_with_question_types():
    cfg = load_config(None, ["dataset.name=easy_vqa"])
    train = load_samples(cfg.dataset, "train")
    test = load_samples(cfg.dataset, "test")
    assert (len(train), len(test)) == (38575, 9673)
    assert {s.meta["question_type"] for s in test} == {"yes/no", "color", "shape"}
    assert test[0].load_image().size == (64, 64)


def test_easy_vqa_question_types_follow_what_the_question_asks():
    from defend.data.easy_vqa import EASY_VQA_COLORS, EASY_VQA_SHAPES, easy_vqa_question_type

    assert easy_vqa_question_type("what is the color of the triangle?") == "color"
    assert easy_vqa_question_type("what color is the shape?") == "color"
    assert easy_vqa_question_type("what is the red shape?") == "shape"
    assert easy_vqa_question_type("is there not a red shape?") == "yes/no"
    texts, answers, _ = easy_vqa.get_train_questions()
    expected = {**{c: "color" for c in EASY_VQA_COLORS}, **{s: "shape" for s in EASY_VQA_SHAPES},
                "yes": "yes/no", "no": "yes/no"}
    assert all(easy_vqa_question_type(q) == expected[a] for q, a in zip(texts, answers))


def test_easy_vqa_captions_agree_with_the_direct_answers():
    texts, answers, ids = easy_vqa.get_test_questions()
    attrs = easy_vqa_image_attributes("test")
    for question, answer, image_id in zip(texts, answers, ids):
        if question == "what color is the shape?":
            assert attrs[image_id]["color"] == answer
    captions = load_samples(load_config(None, ["dataset.name=easy_vqa_captions"]).dataset, "test")
    assert len(captions) > 800
    for caption in captions:
        article, color, shape = caption.response.split()
        assert article == "a" and color in EASY_VQA_COLORS and shape in EASY_VQA_SHAPES


def rows(tmp_path):
    image_paths = easy_vqa.get_train_image_paths()
    return {
        "id": ["a", "b"],
        "image": [Image.open(image_paths[0]), Image.open(image_paths[1])],
        "question": ["what color is the shape?", "what is the shape?"],
        "answer": ["blue", "rectangle"],
    }


def test_hf_datasets_folder_and_parquet_load_with_custom_columns(tmp_path):
    ds = datasets.Dataset.from_dict(rows(tmp_path)).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "set.parquet"))
    for path in (tmp_path / "saved", tmp_path / "set.parquet"):
        cfg = load_config(None, ["dataset.name=hf", f"dataset.path={path}", "dataset.prompt_column=question",
                                 "dataset.response_column=answer"])
        samples = load_samples(cfg.dataset)
        assert [s.id for s in samples] == ["a", "b"]
        assert samples[1].prompt == "what is the shape?" and samples[1].response == "rectangle"
        assert samples[0].load_image().size == (64, 64)
