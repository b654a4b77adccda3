"""The base stage (perception pretraining), the teacher's flawed rationales, and the anatomy of answers."""

import random

import polars as pl
import pytest

from src_assets.base_stage import (
    CAPTION_KIND,
    StopWhenPerceiving,
    perception_corpus,
    probe_scenes,
    score_captions,
    train_base_policy,
)
from src_assets.evaluation import anatomy, any_correct_and_consistent, score_responses
from src_assets.scenes import (
    CAPTION_QUESTION,
    Question,
    Scene,
    SceneObject,
    conclusion_sentence,
    describe_scene,
    generate_examples,
    gold_response,
    teacher_response,
)
from src_assets.source_data import synthetic_source
from src_assets.training import TrainSettings
from src_assets.verifier import verify, verify_caption

SCENE = Scene(
    (
        SceneObject("red", "square", "top", "left"),
        SceneObject("blue", "circle", "middle", "center"),
        SceneObject("red", "circle", "bottom", "right"),
    )
)
COUNT = Question("count", color="red")


def test_the_perception_corpus_holds_captions_and_direct_answers_on_scenes_of_its_own():
    corpus = perception_corpus(400, seed=3, caption_share=0.5)
    captions = corpus.filter(pl.col("kind") == CAPTION_KIND)
    assert 150 < captions.height < 250
    assert set(captions["question"]) == {CAPTION_QUESTION}
    for r in captions.head(20).iter_rows(named=True):
        assert r["completion"] == describe_scene(Scene.from_json(r["scene"]))
    direct = corpus.filter(pl.col("kind") != CAPTION_KIND)
    assert set(direct["kind"]) == {"count", "exists", "attribute", "position", "compare"}
    # A direct answer states the asked subject in one sentence, then the answer line: no listing of the scene.
    for r in direct.head(40).iter_rows(named=True):
        sentence, answer = r["completion"].split("\n")
        assert answer.startswith("Answer: ") and not sentence.startswith("there is")
        assert sentence == conclusion_sentence(
            Scene.from_json(r["scene"]).objects, Question.from_json(r["question_spec"])
        )
    short = perception_corpus(400, seed=3, caption_share=0.5, answer_form="short").filter(
        pl.col("kind") != CAPTION_KIND
    )
    assert all(c.startswith("Answer: ") and "\n" not in c for c in short["completion"])
    assert short["id"].to_list() == direct["id"].to_list()
    with pytest.raises(ValueError, match="answer_form"):
        perception_corpus(4, seed=3, answer_form="essay")
    # Its scenes come from a stream of their own: only chance repeats (small scenes recur) of the splits' scenes.
    splits = synthetic_source(3, 200, 200, 200)
    assert len(set(corpus["scene"]) & set(splits["scene"])) < 0.05 * corpus.height
    assert perception_corpus(400, seed=3)["completion"].to_list() == corpus["completion"].to_list()


def test_captions_are_scored_for_factuality_and_exact_listing():
    assert verify_caption(describe_scene(SCENE), SCENE) == (1.0, True)
    missing = "there is a red square at the top left. there is a blue circle at the middle center."
    assert verify_caption(missing, SCENE) == (1.0, False)
    wrong = missing + " there is a green circle at the bottom right."
    fact, exact = verify_caption(wrong, SCENE)
    assert fact == pytest.approx(2 / 3) and not exact
    assert verify_caption(describe_scene(SCENE) + " so there is a red square.", SCENE)[1] is False
    assert verify_caption("", SCENE) == (0.0, False)
    rows = pl.DataFrame({"id": ["a", "b"], "scene": [SCENE.to_json()] * 2})
    scored = score_captions(rows, [describe_scene(SCENE), wrong])
    assert scored["exact_listing"].to_list() == [1.0, 0.0]


def test_the_teacher_misperceives_one_object_and_keeps_the_gold_answer():
    rng = random.Random(0)
    examples = generate_examples(200, seed=1, split="sft")
    flawed = 0
    for e in examples:
        response = teacher_response(e.scene, e.question, rng, error_rate=1.0)
        v = verify(response, e.scene, e.question)
        assert v.correct == 1.0  # the answer line is the dataset's label
        if response != gold_response(e.scene, e.question):
            flawed += 1
            untrue = [c for c in v.claims if c.kind == "object" and not c.true]
            assert len(untrue) == 1 and not v.exact_listing
    assert flawed >= 190  # a few position questions have no answer after the mistake and stay gold
    assert all(teacher_response(e.scene, e.question, rng, 0.0) == gold_response(e.scene, e.question) for e in examples)


def test_the_teacher_slips_in_one_step_and_keeps_true_perception_and_the_gold_answer():
    rng = random.Random(0)
    for e in generate_examples(200, seed=1, split="sft"):
        v = verify(teacher_response(e.scene, e.question, rng, slip_rate=1.0), e.scene, e.question)
        assert v.correct == 1.0 and v.exact_listing and v.factuality == 1.0  # a reasoning error only
        assert not v.steps_follow and not v.consistency
        assert v.conclusion_follows_steps  # the conclusion copies the slipped state


def test_the_teacher_error_rate_sets_the_share_of_flawed_sft_rationales_only():
    clean = synthetic_source(2, 300, 50, 50)
    flawed = synthetic_source(2, 300, 50, 50, teacher_error_rate=0.3)
    differs = [a != b for a, b in zip(clean["response"], flawed["response"])]
    sft = clean["split"] == "sft"
    assert 60 < sum(d for d, s in zip(differs, sft) if s) < 120
    assert not any(d for d, s in zip(differs, sft) if not s)
    assert clean["answer"].to_list() == flawed["answer"].to_list()
    slipped = synthetic_source(2, 300, 50, 50, teacher_slip_rate=0.3)
    differs = [a != b for a, b in zip(clean["response"], slipped["response"])]
    assert 60 < sum(d for d, s in zip(differs, sft) if s) < 120
    assert not any(d for d, s in zip(differs, sft) if not s)


def test_the_anatomy_says_where_each_error_comes_from():
    steps = "there is a red square at the top left, red count one. there is a blue circle at the middle center, red count one."
    all_steps = steps + " there is a red circle at the bottom right, red count two."
    slipped = steps + " there is a red circle at the bottom right, red count one."
    responses = {
        "gold": gold_response(SCENE, COUNT),
        # exact listing and steps, a conclusion that does not copy the last state, an answer that follows it
        "bad_conclusion": all_steps + " so the number of red shapes is one.\nAnswer: one",
        # exact listing, steps and conclusion, but the answer line says something else
        "bad_answer": all_steps + " so the number of red shapes is two.\nAnswer: one",
        # a wrong listing (the last object missed) whose own steps, conclusion and answer follow from it
        "bad_listing": steps + " so the number of red shapes is one.\nAnswer: one",
        # exact listing, a step that slips, and a conclusion and answer that follow the slip
        "bad_step": slipped + " so the number of red shapes is one.\nAnswer: one",
    }
    v = {k: verify(r, SCENE, COUNT) for k, r in responses.items()}
    assert v["gold"].exact_listing and v["gold"].steps_follow
    assert v["gold"].conclusion_follows_listing and v["gold"].answer_is_conclusion
    assert (v["bad_conclusion"].exact_listing, v["bad_conclusion"].conclusion_follows_listing) == (True, False)
    assert v["bad_conclusion"].steps_follow and not v["bad_conclusion"].conclusion_follows_steps
    assert v["bad_conclusion"].answer_is_conclusion and not v["bad_answer"].answer_is_conclusion
    assert v["bad_answer"].conclusion_follows_listing
    assert not v["bad_listing"].exact_listing and v["bad_listing"].steps_follow
    assert v["bad_listing"].conclusion_follows_listing and v["bad_listing"].consistency
    assert v["bad_step"].exact_listing and not v["bad_step"].steps_follow and v["bad_step"].conclusion_follows_steps
    assert v["bad_step"].factuality == 1.0 and not v["bad_step"].consistency

    rows = pl.DataFrame(
        {
            "id": list(responses),
            "kind": ["count"] * 5,
            "scene": [SCENE.to_json()] * 5,
            "question_spec": [COUNT.to_json()] * 5,
            "answer": ["two"] * 5,
        }
    )
    table = anatomy(score_responses(rows, list(responses.values())))
    assert table["all"]["accuracy"] == 0.2 and table["all"]["exact_listing"] == 0.8
    assert table["all"]["steps_follow"] == 0.8
    assert table["all"]["conclusion_follows_listing"] == 0.6 and table["all"]["answer_is_conclusion"] == 0.8
    assert table["all"]["wrong_with_exact_listing"] == 0.6 and table["all"]["wrong_with_wrong_listing"] == 0.2
    assert table["count"] == table["all"]
    headroom = any_correct_and_consistent(
        rows.head(2), [[responses["bad_answer"], responses["gold"]], [responses["bad_conclusion"]]]
    )
    assert headroom == {"all": 0.5, "count": 0.5}


def test_the_base_stage_trains_the_tiny_vlm_on_its_corpus(tiny_dirs, tmp_path):
    from src_assets.models import load_policy

    corpus = perception_corpus(16, seed=0)
    result = train_base_policy(
        str(tiny_dirs[0]),
        corpus,
        str(tmp_path),
        TrainSettings(epochs=1, batch_size=8, lr_scheduler_type="constant_with_warmup"),
    )
    assert result["steps"] == 2
    model, _ = load_policy(str(tmp_path))
    assert type(model).__name__ == "LlavaForConditionalGeneration"


def test_the_base_stage_stops_once_its_probe_captions_list_the_scene(tiny_dirs, tmp_path):
    corpus = perception_corpus(32, seed=0)  # 4 steps an epoch at batch size 8
    settings = TrainSettings(epochs=2, batch_size=8, lr_scheduler_type="constant_with_warmup")
    probe = probe_scenes(3, seed=0)
    reached = StopWhenPerceiving(probe, every=2, target=0.0)  # any caption reaches 0: stop at the first check
    assert train_base_policy(str(tiny_dirs[0]), corpus, str(tmp_path / "a"), settings, stop=reached)["steps"] == 2
    assert [step for step, _ in reached.checks] == [2]
    never = StopWhenPerceiving(probe, every=3, target=1.0)  # an untrained tiny model never lists a scene exactly
    result = train_base_policy(str(tiny_dirs[0]), corpus, str(tmp_path / "b"), settings, stop=never)
    assert result["steps"] == 8 and result["probe_checks"] == never.checks
    assert [(step, exact) for step, exact in never.checks] == [(3, 0.0), (6, 0.0)]
    assert set(probe["id"]).isdisjoint(set(perception_corpus(32, seed=0)["id"]))
