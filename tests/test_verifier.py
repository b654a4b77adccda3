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
OBJECTS = ("a red square at the top left", "a blue circle at the middle center", "a red circle at the bottom right")
# Each kind's steps over SCENE, written out by hand: the checks of each object, then the state after it.
CLAUSES = {
    "count": ("red count one", "red count one", "red count two"),
    "exists": ("blue no square yes found no", "blue yes square no found no", "blue no square no found no"),
    "attribute": ("color none", "color none", "color red"),
    "position": (
        "blue no circle no place none",
        "blue yes circle yes place middle center",
        "blue no circle yes place middle center",
    ),
    "compare": ("red count one blue count zero", "red count one blue count one", "red count two blue count one"),
}


def steps(kind, clauses=None):
    return " ".join(f"there is {o}, {c}." for o, c in zip(OBJECTS, clauses or CLAUSES[kind]))


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
    v = verify(f"{steps(kind)} {conclusion} Answer: {answer}", SCENE, QUESTIONS[kind])
    assert v.correct == v.consistency == v.factuality == v.completeness == 1.0
    assert v.steps_follow and v.conclusion_follows_steps and v.answer_is_conclusion and v.problems == []
    assert [c.kind for c in v.claims][-1] == ("count" if kind == "compare" else kind)
    assert verify(f"{steps(kind)} {conclusion} Answer: {answer}", SCENE, QUESTIONS[kind]) == v
    assert gold_response(SCENE, QUESTIONS[kind]) == f"{steps(kind)} {conclusion}\nAnswer: {answer}"


def test_a_plain_listing_without_steps_does_not_reason():
    v = verify(f"{PERCEPTION} so the number of red shapes is two. Answer: two", SCENE, QUESTIONS["count"])
    assert v.correct == v.factuality == 1.0 and v.exact_listing
    assert not v.steps_follow and v.consistency == 0.0 and "a reasoning step does not follow" in v.problems


def test_counterfactual_claim_lowers_factuality_only():
    # The top-left square is seen green: a false perception, reasoned from correctly, so the steps follow.
    response = (
        "there is a green square at the top left, red count zero. there is a blue circle at the middle center, "
        "red count zero. there is a red circle at the bottom right, red count one. so the number of red shapes is "
        "one. Answer: one"
    )
    v = verify(response, SCENE, QUESTIONS["count"])
    assert v.factuality == pytest.approx(2 / 3)  # perception sentences only
    assert v.steps_follow and v.consistency == 1.0  # consistent with its own (wrong) perception
    assert v.correct == 0.0
    assert v.completeness == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "kind, clauses",
    [
        ("count", ("red count one", "red count two", "red count three")),  # a tally that counts a blue circle
        ("exists", ("blue no square yes found no", "blue yes square no found yes", "blue no square no found yes")),
        ("exists", ("blue no square yes found no", "blue yes square yes found no", "blue no square no found no")),
        ("attribute", ("color none", "color blue", "color red")),
        (
            "position",
            ("blue no circle no place none", "blue yes circle yes place none", "blue no circle yes place none"),
        ),
        (
            "compare",
            ("red count one blue count zero", "red count one blue count zero", "red count two blue count zero"),
        ),
    ],
)
def test_a_step_that_does_not_follow_is_a_reasoning_error_not_a_factuality_error(kind, clauses):
    """Each slip is in one state (or one check); the steps after it follow from it locally."""
    v = verify(f"{steps(kind, clauses)} Answer: no", SCENE, QUESTIONS[kind])
    assert not v.steps_follow and v.consistency == 0.0
    assert v.exact_listing and v.factuality == 1.0
    assert "a reasoning step does not follow" in v.problems


def test_a_conclusion_that_does_not_copy_the_last_state_is_a_reasoning_error():
    v = verify(f"{steps('count')} so the number of red shapes is three. Answer: three", SCENE, QUESTIONS["count"])
    assert v.steps_follow and v.steps_answer == "two" and v.conclusion == "three"
    assert not v.conclusion_follows_steps and v.answer_is_conclusion
    assert v.factuality == 1.0 and v.consistency == 0.0


def test_an_answer_line_that_differs_from_the_conclusion_is_an_alignment_error():
    v = verify(f"{steps('count')} so the number of red shapes is two. Answer: three", SCENE, QUESTIONS["count"])
    assert v.steps_follow and v.conclusion_follows_steps and not v.answer_is_conclusion
    assert v.factuality == 1.0 and v.consistency == 0.0 and v.correct == 0.0


def test_missing_object_lowers_completeness():
    response = "there is a red square at the top left, red count one. so the number of red shapes is one. Answer: one"
    v = verify(response, SCENE, QUESTIONS["count"])
    assert v.completeness == pytest.approx(1 / 3)
    assert v.factuality == 1.0  # what it perceived is true; it missed an object
    assert v.consistency == 1.0 and v.correct == 0.0


def test_answer_contradicting_its_own_rationale_is_inconsistent():
    response = f"{steps('count')} so the number of red shapes is two. Answer: three"
    v = verify(response, SCENE, QUESTIONS["count"])
    assert v.factuality == 1.0 and v.completeness == 1.0
    assert v.consistency == 0.0 and v.correct == 0.0
    assert "answer does not follow from the rationale" in v.problems


def test_right_answer_against_its_own_conclusion_is_inconsistent():
    response = f"{steps('exists')} so there is a blue square. Answer: no"
    v = verify(response, SCENE, QUESTIONS["exists"])
    assert v.correct == 1.0 and v.factuality == 1.0
    assert v.consistency == 0.0 and not v.conclusion_follows_steps


@pytest.mark.parametrize(
    "response, problem",
    [
        ("", "empty response"),
        (None, "empty response"),
        ("   \n ", "empty response"),
        (f"{PERCEPTION} so the number of red shapes is two.", "no answer line"),
        ("there is a red square at the", "no answer line"),  # truncated mid-sentence
        ("there is a red square at the top left, red count", "no answer line"),  # truncated mid-step
        ("the dog barks loudly. Answer: two", "unknown words: barks dog loudly"),
        ("Answer:", "no answer line"),
        ("%%% ::: ...", "no answer line"),
        (":::: answer : : answer", "answer does not follow from the rationale"),
        ("there is a red square at the top left, , , count. Answer: two", "a reasoning step does not follow"),
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


def test_a_direct_answer_is_scored_on_its_conclusion():
    assert verify("so the number of red shapes is two. Answer: two", SCENE, QUESTIONS["count"]).factuality == 1.0
    assert verify("so the number of red shapes is one. Answer: one", SCENE, QUESTIONS["count"]).factuality == 0.0


def test_an_answer_that_no_conclusion_reaches_is_not_consistent():
    # The steps reach "two" red shapes, but the conclusion is about blue ones: the rationale never reaches its answer.
    v = verify(f"{steps('count')} so the number of blue shapes is one. Answer: two", SCENE, QUESTIONS["count"])
    assert v.correct == 1.0 and v.factuality == 1.0 and v.exact_listing and v.steps_follow
    assert v.consistency == 0.0 and v.conclusion is None and v.listing_answer == "two"
    assert verify(f"{steps('count')} Answer: two", SCENE, QUESTIONS["count"]).consistency == 0.0
