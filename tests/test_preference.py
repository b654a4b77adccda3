import polars as pl
import pytest
import torch

from src_assets.preference import AggregationConfig, CurationConfig, curate_preferences, score_table


def _fixture(n_prompts=40, K=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [f"q{i}" for i in range(n_prompts)]
    ks = [K if i % 7 else max(1, i % 3) for i in range(n_prompts)]  # some prompts with 1 or 2 candidates
    matrices = [torch.rand(k, k, generator=g).tolist() for k in ks]
    cand = []
    for pid, k in zip(ids, ks):
        for c in range(k):
            answer = "two" if (c + len(pid)) % 2 else "three"
            cand.append(
                {"prompt_id": pid, "candidate": c, "text": f"{pid} candidate {c}\nAnswer: {answer}", "answer": answer}
            )
    prompts = pl.DataFrame(
        {"id": ids, "question": ["how many?"] * n_prompts, "answer": ["two"] * n_prompts, "image": [b"png"] * n_prompts}
    )
    return ids, matrices, pl.DataFrame(cand), prompts


def test_kernel_and_reference_give_the_same_preference_set():
    ids, matrices, cand, prompts = _fixture()
    cfg = CurationConfig(tau=0.05)
    via_kernel = score_table(ids, matrices, AggregationConfig(backend="triton"))
    via_torch = score_table(ids, matrices, AggregationConfig(backend="torch"))
    assert via_kernel["chosen"].to_list() == via_torch["chosen"].to_list()
    a = curate_preferences(cand, via_kernel, prompts, cfg)
    b = curate_preferences(cand, via_torch, prompts, cfg)
    assert a.drop("weight").equals(b.drop("weight"))
    assert a["weight"].to_list() == pytest.approx(b["weight"].to_list(), abs=1e-6)
    assert a["kept"].sum() > 0


def test_curation_rules():
    ids, matrices, cand, prompts = _fixture()
    scores = score_table(ids, matrices, AggregationConfig(backend="torch"))
    prefs = curate_preferences(cand, scores, prompts, CurationConfig(tau=0.2, pairs_per_prompt=1))
    assert prefs.height == len(ids)  # one pair considered per prompt
    assert ((prefs["weight"] >= 0) & (prefs["weight"] <= 1)).all()
    kept = prefs.filter("kept")
    assert (kept["chosen_answer"] == "two").all() and (kept["weight"] >= 0.2).all()
    reasons = prefs.filter(~pl.col("kept"))["drop_reason"].to_list()
    assert all(r is not None for r in reasons)
    assert any(r == "fewer than 2 candidates" for r in reasons)
    assert any(r.startswith("chosen answer 'three' is wrong (gold 'two')") for r in reasons)
    assert any(r.startswith("weight ") and "below tau 0.2" in r for r in reasons)


def test_weight_is_the_debiased_margin_times_order_agreement():
    # Candidate 0 beats 1 in both orders: p(0,1) = 0.9 and p(1,0) = 0.3.
    scores = score_table(["x"], [[[0.5, 0.9], [0.3, 0.5]]], AggregationConfig(backend="torch"))
    s = scores.row(0, named=True)
    assert (s["chosen"], s["rejected"]) == (0, 1)
    q01 = (0.9 + 1 - 0.3) / 2
    agreement = 1 - abs(0.9 + 0.3 - 1)
    assert s["confidence"] == pytest.approx((2 * q01 - 1) * agreement, abs=1e-6)


def test_several_pairs_per_prompt_and_win_rate_selection():
    ids, matrices, cand, prompts = _fixture(n_prompts=6, K=6)
    scores = score_table(ids, matrices, AggregationConfig(backend="torch"))
    prefs = curate_preferences(
        cand,
        scores,
        prompts,
        CurationConfig(tau=0.0, pairs_per_prompt=3, require_correct_chosen=False),
        select_by="win_rate",
    )
    per_prompt = prefs.group_by("prompt_id").len()
    assert per_prompt.filter(pl.col("prompt_id") == "q1")["len"].item() == 3
    s = scores.filter(pl.col("prompt_id") == "q1").row(0, named=True)
    best = max(range(6), key=lambda i: (s["win_rate"][i], -i))
    first = prefs.filter(pl.col("prompt_id") == "q1").row(0, named=True)
    assert first["chosen"] == f"q1 candidate {best}" + ("\nAnswer: two" if (best + 2) % 2 else "\nAnswer: three")


@pytest.mark.parametrize(
    "settings_type, kwargs, message",
    [
        (AggregationConfig, {"select_by": "mean"}, "select_by"),
        (CurationConfig, {"tau": 2.0}, "tau"),
        (AggregationConfig, {"backend": "cuda"}, "backend"),
    ],
)
def test_bad_curation_settings_are_named(settings_type, kwargs, message):
    with pytest.raises(ValueError, match=message):
        settings_type(**kwargs)


def test_the_check_and_curation_compare_answers_alike():
    """``chosen_correct`` is curation's own comparison (whitespace and case normalised), which the
    ``no_wrong_chosen_answer`` check reads: an answer that differs only in spacing is correct for both."""
    cand = pl.DataFrame(
        {"prompt_id": ["p", "p"], "candidate": [0, 1], "text": ["a", "b"], "answer": ["Top  left.", "bottom right"]}
    )
    prompts = pl.DataFrame({"id": ["p"], "question": ["where?"], "answer": ["top left"], "image": [b""]})
    scores = score_table(["p"], [[[0.5, 0.95], [0.05, 0.5]]], AggregationConfig(backend="torch"))
    prefs = curate_preferences(cand, scores, prompts, CurationConfig(tau=0.0, pairs_per_prompt=1))
    assert prefs["kept"].to_list() == [True] and prefs["chosen_correct"].to_list() == [True]


def test_where_the_verifier_can_tell_a_chosen_response_must_be_consistent_and_true():
    from src_assets.evaluation import preference_quality
    from src_assets.scenes import Question, Scene, SceneObject, gold_response, reasoning_steps

    scene = Scene(
        (
            SceneObject("red", "square", "top", "left"),
            SceneObject("blue", "circle", "middle", "center"),
            SceneObject("red", "circle", "bottom", "right"),
        )
    )
    question = Question("count", color="red")
    steps = " ".join(reasoning_steps(scene.objects, question)[0])
    chosen = {
        "sound": gold_response(scene, question),
        # right answer, but the rationale's conclusion says otherwise
        "inconsistent": steps + " so the number of red shapes is one.\nAnswer: two",
        # right answer that follows from its rationale, which has an untrue sentence (the blue circle is green)
        "untrue": steps.replace("blue circle", "green circle") + " so the number of red shapes is two.\nAnswer: two",
    }
    rejected = steps + " so the number of red shapes is one.\nAnswer: one"
    ids = list(chosen)
    cand = pl.DataFrame(
        [
            {"prompt_id": p, "candidate": c, "text": t, "answer": t.split("Answer: ")[1]}
            for p in ids
            for c, t in enumerate((chosen[p], rejected))
        ]
    )
    prompts = pl.DataFrame(
        {
            "id": ids,
            "question": ["how many red shapes?"] * 3,
            "answer": ["two"] * 3,
            "image": [b""] * 3,
            "scene": [scene.to_json()] * 3,
            "question_spec": [question.to_json()] * 3,
        }
    )
    scores = score_table(ids, [[[0.5, 0.95], [0.05, 0.5]]] * 3, AggregationConfig(backend="torch"))

    prefs = curate_preferences(cand, scores, prompts, CurationConfig(tau=0.0))
    assert prefs["gold_response"].to_list() == [chosen["sound"]] * 3  # what the gold-data bound trains on
    assert dict(zip(prefs["prompt_id"], prefs["kept"])) == {"sound": True, "inconsistent": False, "untrue": False}
    reasons = dict(zip(prefs["prompt_id"], prefs["drop_reason"]))
    assert reasons["inconsistent"] == "chosen answer does not follow from its rationale"
    assert reasons["untrue"] == "chosen response has an untrue sentence"
    assert preference_quality(prefs, prompts) == {
        "chosen_correct": 1.0,
        "chosen_consistent": 1.0,
        "chosen_fully_factual": 1.0,
        "rejected_correct": 0.0,
        "rejected_consistent": 0.0,
        "rejected_fully_factual": 1.0,  # its listing is true; its conclusion is a reasoning error
    }

    lenient = curate_preferences(
        cand, scores, prompts, CurationConfig(tau=0.0, require_consistent_chosen=False, require_factual_chosen=False)
    )
    assert lenient["kept"].all()
    quality = preference_quality(lenient, prompts)
    # The inconsistent one lists the scene truly (its error is in the reasoning); the untrue one does not.
    assert quality["chosen_consistent"] == pytest.approx(2 / 3) and quality["chosen_fully_factual"] == pytest.approx(
        2 / 3
    )
    only_consistent = curate_preferences(cand, scores, prompts, CurationConfig(tau=0.0, require_factual_chosen=False))
    assert only_consistent["kept"].to_list() == [True, False, True]
    # A prompt without a scene (a user's own data) is not judged by the verifier.
    no_scene = prompts.with_columns(pl.lit(None, pl.String).alias("scene"))
    assert curate_preferences(cand, scores, no_scene, CurationConfig(tau=0.0))["kept"].all()
    assert preference_quality(curate_preferences(cand, scores, no_scene, CurationConfig(tau=0.0)), no_scene) == {}
