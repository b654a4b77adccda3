import io

import polars as pl
import pytest
from PIL import Image

from src_assets.evaluation import score_responses, summarize, with_blank_images
from src_assets.judge import Judge
from src_assets.models import load_judge_model
from src_assets.source_data import synthetic_source
from src_assets.verifier import verifier_win_rate


def test_gold_responses_score_perfectly_and_wrong_ones_do_not():
    ev = synthetic_source(seed=4, n_sft=0, n_calibrate=0, n_eval=10)
    perfect = summarize(score_responses(ev, ev["response"].to_list()))
    assert perfect == {"accuracy": 1.0, "factuality": 1.0, "completeness": 1.0, "consistency": 1.0, "n": 10}
    broken = summarize(score_responses(ev, ["", *ev["response"].to_list()[1:]]))
    assert broken["accuracy"] == pytest.approx(0.9) and broken["consistency"] == pytest.approx(0.9)


def test_rows_without_a_scene_get_accuracy_from_the_answer_column_only():
    ev = synthetic_source(seed=4, n_sft=0, n_calibrate=0, n_eval=3).with_columns(pl.lit(None, pl.String).alias("scene"))
    responses = ev["response"].to_list()
    responses[0] = responses[0].rsplit("Answer:", 1)[0] + "Answer: purple"
    scored = score_responses(ev, responses)
    assert scored["accuracy"].to_list() == [0.0, 1.0, 1.0]
    assert scored["consistency"].null_count() == 3 and scored["factuality"].null_count() == 3


def test_blank_images_keep_the_size_and_carry_nothing():
    ev = synthetic_source(seed=4, n_sft=0, n_calibrate=0, n_eval=3)
    blank = with_blank_images(ev)
    assert blank["id"].to_list() == ev["id"].to_list()
    for before, after in zip(ev["image"], blank["image"]):
        original, image = Image.open(io.BytesIO(before)), Image.open(io.BytesIO(after)).convert("RGB")
        assert image.size == original.size
        assert image.getextrema() == ((255, 255), (255, 255), (255, 255))


def test_verifier_win_rate_prefers_the_gold_response():
    ev = synthetic_source(seed=4, n_sft=0, n_calibrate=0, n_eval=4)
    gold = ev["response"].to_list()
    wrong = [g.rsplit("Answer:", 1)[0] + "Answer: purple" for g in gold]
    assert verifier_win_rate(ev, gold, wrong) == 1.0
    assert verifier_win_rate(ev, wrong, gold) == 0.0
    assert verifier_win_rate(ev, gold, gold) == 0.5


def test_judge_win_rate_is_debiased(tiny_dirs):
    model, tok = load_judge_model(str(tiny_dirs[1]))
    judge = Judge(model=model, tokenizer=tok)
    ev = synthetic_source(seed=4, n_sft=0, n_calibrate=0, n_eval=4)
    same = ev["response"].to_list()
    # Both orders judged: a response against itself is exactly even, whatever the judge's position bias.
    assert judge.win_rate(ev, same, same) == pytest.approx(0.5, abs=1e-6)
    other = ["Answer: no"] * 4
    assert judge.win_rate(ev, same, other) == pytest.approx(1 - judge.win_rate(ev, other, same), abs=1e-6)
