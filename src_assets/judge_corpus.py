"""The judge's training set: every labelled pair it learns from, built by one function.

Three sources, each row a judge prompt (``judge.judge_prompt``) and the verdict it should be followed by:

- **the policy's own candidates**: the SFT policy's sentence-level beam search on the judge's prompts, every
  ordered pair labelled by the verifier (``verifier.verifier_verdict``), where the prompts have a scene;
- **contrast pairs**: a gold response against perturbed copies of itself (a wrong answer, a misperceived object
  reasoned from, a slipped reasoning step, a wrong conclusion with a matching answer), every ordered pair labelled
  by the verifier. They cost no sampling
  and show a small judge what to compare far sooner than the policy's candidates alone;
- **your judgements**: a judgement table (``source_data.validate_judgements``), each pair in both orders with the
  verdict swapped, so the judge learns the judgement and not the position.
"""

from __future__ import annotations

import random
from itertools import permutations

import polars as pl

from .fingerprints import derive_seed
from .judge import JudgeConfig, judge_prompt, verdict_completion
from .scenes import (
    COLORS,
    COLUMNS,
    NUMBER_WORDS,
    ROWS,
    Question,
    Scene,
    answer_question,
    conclusion_from_state,
    gold_response,
    misperceived,
    rationale_response,
    reasoning_steps,
    slipped_state,
    state_answer,
)
from .verifier import response_quality, verifier_verdict

JUDGEMENT_ROWS = {"prompt": pl.String, "completion": pl.String, "verdict": pl.String}


# The random stream of the judge's training candidates. Its label is the judge's earlier name, kept so that a seed
# gives the candidates (and the judge, and the tables in docs/results.md) it gave before the rename.
CANDIDATE_STREAM = "r_scorer_candidates"


def _labelled(tokenizer, prompt: dict, texts: list[str], pairs, cfg: JudgeConfig) -> list[dict]:
    """Judge training rows for the ordered ``pairs`` of ``texts``, labelled by the verifier."""
    scores = [response_quality(x, prompt["scene"], prompt["question_spec"], cfg.quality_weights) for x in texts]
    rows = []
    for i, j in pairs:
        verdict = verifier_verdict(scores[i], scores[j], cfg.tie_margin)
        text = judge_prompt(tokenizer, prompt, texts[i], texts[j], cfg.template)
        rows.append({"prompt": text, "completion": verdict_completion(verdict), "verdict": verdict})
    return rows


def _at_most(rows: list[dict], n: int, seed: int) -> pl.DataFrame:
    if len(rows) > n:
        rows = random.Random(seed).sample(rows, n)
    return pl.DataFrame(rows, schema=JUDGEMENT_ROWS)


def candidate_judgements(
    candidates: pl.DataFrame,
    prompts: pl.DataFrame,
    tokenizer,
    cfg: JudgeConfig = JudgeConfig(),
    max_pairs: int | None = None,
    seed: int = 0,
) -> pl.DataFrame:
    """Every ordered pair of each prompt's candidates, labelled by the verifier (prompts without a scene have no
    verifier and are skipped); at most ``max_pairs`` of them, drawn at random."""
    truth = {r["id"]: r for r in prompts.iter_rows(named=True)}
    rows = []
    for (pid,), group in candidates.group_by("prompt_id", maintain_order=True):
        prompt = truth[pid]
        if prompt["scene"] is None:
            continue
        texts = group.sort("candidate")["text"].to_list()
        rows += _labelled(tokenizer, prompt, texts, permutations(range(len(texts)), 2), cfg)
    return _at_most(rows, len(rows) if max_pairs is None else max_pairs, derive_seed(seed, "candidate_judgements"))


def _other_answers(answer: str) -> list[str]:
    """Wrong answers of the same kind as ``answer``: another number, colour, position, or the other of yes/no."""
    for space in (NUMBER_WORDS[:6], COLORS, ("yes", "no"), tuple(f"{r} {c}" for r in ROWS for c in COLUMNS)):
        if answer in space:
            return [a for a in space if a != answer]
    return ["no"] if answer != "no" else ["yes"]


def perturbed_responses(scene: Scene, question: Question, rng: random.Random) -> list[str]:
    """Contrasting versions of the gold response to ``question`` about ``scene``, one of each kind of error a policy
    makes (``verifier``):

    - alignment: the gold rationale with a wrong final answer;
    - factuality: one object misperceived, the steps and the answer reasoned from what was seen;
    - reasoning: one state slipped, the later steps, the conclusion and the answer following from it;
    - reasoning: the gold steps with a wrong conclusion, and an answer that agrees with the conclusion.
    """
    objects, gold = scene.objects, answer_question(scene.objects, question)
    wrong = rng.choice(_other_answers(gold))
    out = [rationale_response(objects, question, wrong)]
    seen = misperceived(scene, rng)
    if answer_question(seen.objects, question) is not None:
        out.append(rationale_response(seen.objects, question, answer_question(seen.objects, question)))
    slipped_steps, slipped = reasoning_steps(objects, question, rng.randrange(len(objects)), rng)
    out.append(_concluded(slipped_steps, question, slipped))
    steps, last = reasoning_steps(objects, question)
    out.append(_concluded(steps, question, _miscopied(question, last, rng)))
    return out


def _miscopied(question: Question, state, rng: random.Random):
    """A state other than ``state`` whose answer differs too (a compare's tallies moved across each other)."""
    if question.kind == "compare":
        first, second = state
        return (second, second) if first > second else (second + 1, second)
    return slipped_state(question, state, rng)


def _concluded(steps: list[str], question: Question, state) -> str:
    """``steps``, then a conclusion that copies ``state`` and the answer line that states it."""
    return " ".join([*steps, conclusion_from_state(question, state)]) + f"\nAnswer: {state_answer(question, state)}"


def contrast_judgements(
    rows: pl.DataFrame, tokenizer, cfg: JudgeConfig = JudgeConfig(), max_pairs: int | None = None, seed: int = 0
) -> pl.DataFrame:
    """Each row's gold response and its perturbed copies, every ordered pair of them labelled by the verifier; at
    most ``max_pairs`` (0: none), drawn at random. Rows without a ``scene`` are skipped; the gold response is
    written from the scene and ``question_spec``."""
    if max_pairs == 0:
        return pl.DataFrame(schema=JUDGEMENT_ROWS)
    rng = random.Random(derive_seed(seed, "perturbed_responses"))
    out = []
    for prompt in rows.filter(pl.col("scene").is_not_null()).iter_rows(named=True):
        scene, question = Scene.from_json(prompt["scene"]), Question.from_json(prompt["question_spec"])
        texts = [gold_response(scene, question), *perturbed_responses(scene, question, rng)]
        out += _labelled(tokenizer, prompt, texts, permutations(range(len(texts)), 2), cfg)
    return _at_most(out, len(out) if max_pairs is None else max_pairs, derive_seed(seed, "contrast_judgements"))


def user_judgements(table: pl.DataFrame, tokenizer, cfg: JudgeConfig = JudgeConfig()) -> pl.DataFrame:
    """Judge training rows from a judgement table: each pair in both orders, the verdict swapped with the order."""
    swap = {"A": "B", "B": "A", "tie": "tie"}
    rows = []
    for t in table.iter_rows(named=True):
        for first, second, verdict in (
            (t["response_a"], t["response_b"], t["verdict"]),
            (t["response_b"], t["response_a"], swap[t["verdict"]]),
        ):
            text = judge_prompt(tokenizer, t, first, second, cfg.template)
            rows.append({"prompt": text, "completion": verdict_completion(verdict), "verdict": verdict})
    return pl.DataFrame(rows, schema=JUDGEMENT_ROWS)


def judge_training_set(
    tokenizer,
    cfg: JudgeConfig,
    *,
    policy_dir: str,
    runtime,
    search,
    prompts: pl.DataFrame,
    contrast_rows: pl.DataFrame,
    user_table: pl.DataFrame,
    max_pairs: int,
    contrast_pairs: int,
    seed: int,
    progress=False,
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Every pair the judge trains on, and how many came from each source:

    - the candidates of the policy at ``policy_dir`` (the SFT checkpoint) for ``prompts``, by the same
      sentence-level beam search as an iteration's (``search``), where prompts have a scene: at most
      ``max_pairs`` of their ordered pairs;
    - ``contrast_pairs`` contrast pairs from the gold responses of ``prompts`` and then of ``contrast_rows``
      (0: none);
    - every row of ``user_table``, both orders.
    """
    from .candidate_search import sentence_beam_search
    from .models import load_policy

    candidates = pl.DataFrame(schema={"prompt_id": pl.String, "candidate": pl.Int64, "text": pl.String})
    if prompts["scene"].is_not_null().any():
        policy, processor = load_policy(policy_dir, runtime)
        candidates = sentence_beam_search(
            policy, processor, prompts, search, seed=derive_seed(seed, CANDIDATE_STREAM), progress=progress
        )
        del policy
    parts = {
        "candidate_pairs": candidate_judgements(candidates, prompts, tokenizer, cfg, max_pairs, seed),
        "contrast_pairs": contrast_judgements(
            pl.concat([prompts, contrast_rows], how="diagonal_relaxed"), tokenizer, cfg, contrast_pairs, seed
        ),
        "user_pairs": user_judgements(user_table, tokenizer, cfg),
    }
    return pl.concat(list(parts.values())), {name: part.height for name, part in parts.items()}
