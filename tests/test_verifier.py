import pytest

from src_assets.scenes import Question, Scene, SceneObject, gold_response
from src_assets.verifier import verify

SCENE = Scene(
    (
        SceneObject("red", "square", "top", "left"),
        SceneObject("blue", "circle", "middle", "center"),
        SceneObject("red", "circle", "bottom", "right"),
    )
)
PERCEPTION = (
    "there is a red square at the top left. there is a blue circle at the middle center. "
    "there is a red circle at the bottom right."
)
QUESTIONS = {
    "count": Question("count", color="red"),
    "exists": Question("exists", color="blue", shape="square"),
    "attribute": Question("attribute", position="bottom right"),
    "position": Question("position", color="blue", shape="circle"),
    "compare": Question("compare", color="red", other_color="blue"),
}


@pytest.mark.parametrize("kind", sorted(QUESTIONS))
def test_gold_response_scores_perfectly(kind):
    v = verify(gold_response(SCENE, QUESTIONS[kind]), SCENE, QUESTIONS[kind])
    assert v.metrics() == {"correct": 1.0, "factuality": 1.0, "completeness": 1.0, "consistency": 1.0}
    assert v.problems == []


@pytest.mark.parametrize(
    "kind, conclusion, answer",
    [
        ("count", "so the number of red shapes is two.", "two"),
        ("exists", "so there is no blue square.", "no"),
        ("attribute", "so the shape at the bottom right is red.", "red"),
        ("position", "so the blue circle is at the middle center.", "middle center"),
        ("compare", "so the number of red shapes is two and the number of blue shapes is one.", "yes"),
    ],
)
def test_hand_written_response_per_kind(kind, conclusion, answer):
    v = verify(f"{PERCEPTION} {conclusion} Answer: {answer}", SCENE, QUESTIONS[kind])
    assert v.correct == v.consistency == v.factuality == v.completeness == 1.0
    assert [c.kind for c in v.claims][-1] == ("count" if kind == "compare" else kind)


def test_counterfactual_claim_lowers_factuality_only():
    # The top-left square is red, not green; the answer still follows from the claims and is right.
    response = (
        "there is a green square at the top left. there is a blue circle at the middle center. "
        "there is a red circle at the bottom right. so the number of red shapes is one. Answer: one"
    )
    v = verify(response, SCENE, QUESTIONS["count"])
    assert v.factuality == pytest.approx(2 / 4)
    assert v.consistency == 1.0  # consistent with its own (wrong) perception
    assert v.correct == 0.0
    assert v.completeness == pytest.approx(2 / 3)


def test_missing_object_lowers_completeness():
    response = "there is a red square at the top left. so the number of red shapes is one. Answer: one"
    v = verify(response, SCENE, QUESTIONS["count"])
    assert v.completeness == pytest.approx(1 / 3)
    assert v.factuality == pytest.approx(1 / 2)  # the conclusion "one red shape" is false in the scene
    assert v.consistency == 1.0 and v.correct == 0.0


def test_answer_contradicting_its_own_rationale_is_inconsistent():
    response = f"{PERCEPTION} so the number of red shapes is two. Answer: three"
    v = verify(response, SCENE, QUESTIONS["count"])
    assert v.factuality == 1.0 and v.completeness == 1.0
    assert v.consistency == 0.0 and v.correct == 0.0
    assert "answer does not follow from the rationale" in v.problems


def test_right_answer_against_its_own_conclusion_is_inconsistent():
    response = f"{PERCEPTION} so there is a blue square. Answer: no"
    v = verify(response, SCENE, QUESTIONS["exists"])
    assert v.correct == 1.0
    assert v.consistency == 0.0
    assert v.factuality == pytest.approx(3 / 4)


@pytest.mark.parametrize(
    "response, problem",
    [
        ("", "empty response"),
        (None, "empty response"),
        ("   \n ", "empty response"),
        (f"{PERCEPTION} so the number of red shapes is two.", "no answer line"),
        ("there is a red square at the", "no answer line"),  # truncated mid-sentence
        ("the dog barks loudly. Answer: two", "unknown words: barks dog loudly"),
        ("Answer:", "no answer line"),
        ("%%% ::: ...", "no answer line"),
        (":::: answer : : answer", "answer does not follow from the rationale"),
    ],
)
def test_malformed_responses_never_crash(response, problem):
    v = verify(response, SCENE, QUESTIONS["count"])
    assert problem in v.problems
    assert 0.0 <= v.factuality <= 1.0
    assert v.correct == 0.0 or v.answer == "two"


def test_unparseable_sentences_count_as_untrue_claims():
    v = verify("there is a red square at the top left. red red red. Answer: two", SCENE, QUESTIONS["count"])
    assert [c.kind for c in v.claims] == ["object", "unparsed"]
    assert v.factuality == pytest.approx(0.5)
    assert "unparseable sentence" in v.problems


def test_answer_with_no_claims_is_not_consistent():
    v = verify("Answer: two", SCENE, QUESTIONS["count"])
    assert v.correct == 1.0 and v.consistency == 0.0 and v.factuality == 0.0


def test_an_answer_that_no_conclusion_reaches_is_not_consistent():
    # The listing implies "two" red shapes, but the conclusion is about blue ones: the rationale never reaches its answer.
    v = verify(f"{PERCEPTION} so the number of blue shapes is one. Answer: two", SCENE, QUESTIONS["count"])
    assert v.correct == 1.0 and v.factuality == 1.0 and v.exact_listing
    assert v.consistency == 0.0 and v.conclusion is None and v.listing_answer == "two"
    assert verify(f"{PERCEPTION} Answer: two", SCENE, QUESTIONS["count"]).consistency == 0.0
