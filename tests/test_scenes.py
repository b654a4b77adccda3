import io

import pytest
from PIL import Image

from src_assets.scenes import (
    CELL_PIXELS,
    DOMAIN_WORDS,
    QUESTION_KINDS,
    Question,
    Scene,
    SceneObject,
    answer_question,
    generate_examples,
    gold_response,
    render_scene,
)


def test_same_seed_gives_same_rows_and_pixels():
    a = [e.row() for e in generate_examples(25, seed=7, split="sft")]
    b = [e.row() for e in generate_examples(25, seed=7, split="sft")]
    assert a == b
    c = [e.row() for e in generate_examples(25, seed=8, split="sft")]
    assert [r["scene"] for r in a] != [r["scene"] for r in c]


def test_splits_draw_different_scenes_from_one_seed():
    sft = {e.scene for e in generate_examples(50, seed=0, split="sft")}
    ev = {e.scene for e in generate_examples(50, seed=0, split="eval")}
    assert len(sft & ev) < 5  # collisions only by chance, not by sharing a stream


def test_every_kind_appears_in_equal_shares():
    kinds = [e.question.kind for e in generate_examples(50, seed=1, split="sft")]
    assert {k: kinds.count(k) for k in QUESTION_KINDS} == {k: 10 for k in QUESTION_KINDS}


def test_gold_responses_use_only_domain_words():
    known = set(DOMAIN_WORDS)
    for e in generate_examples(100, seed=2, split="sft"):
        words = e.row()["response"].replace(".", " . ").replace(":", " : ").replace(",", " , ").split()
        assert set(words) <= known, set(words) - known


def test_render_draws_each_object_in_its_cell():
    scene = Scene((SceneObject("red", "square", "top", "left"), SceneObject("blue", "circle", "bottom", "right")))
    image = Image.open(io.BytesIO(render_scene(scene))).convert("RGB")
    centre = CELL_PIXELS // 2
    assert image.getpixel((centre, centre)) == (220, 40, 40)
    assert image.getpixel((2 * CELL_PIXELS + centre, 2 * CELL_PIXELS + centre)) == (40, 80, 220)
    assert image.getpixel((CELL_PIXELS + centre, CELL_PIXELS + centre)) == (245, 245, 245)


@pytest.mark.parametrize(
    "question, answer",
    [
        (Question("count", color="red"), "two"),
        (Question("count", shape="triangle"), "zero"),
        (Question("exists", color="blue", shape="circle"), "yes"),
        (Question("exists", color="blue", shape="square"), "no"),
        (Question("attribute", position="middle center"), "blue"),
        (Question("position", color="blue", shape="circle"), "middle center"),
        (Question("compare", color="red", other_color="blue"), "yes"),
        (Question("compare", color="blue", other_color="red"), "no"),
    ],
)
def test_answers_on_a_hand_built_scene(question, answer):
    scene = Scene(
        (
            SceneObject("red", "square", "top", "left"),
            SceneObject("blue", "circle", "middle", "center"),
            SceneObject("red", "circle", "bottom", "right"),
        )
    )
    assert answer_question(scene.objects, question) == answer
    assert gold_response(scene, question).endswith(f"Answer: {answer}")


def test_question_json_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown question kind 'colour'"):
        Question.from_json('{"kind": "colour"}')
