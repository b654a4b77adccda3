"""The verifier: parses any response into claims and checks them against the scene.

It is the evaluation metric of the embedded domain and the teacher that labels
pairs for training the judge. It never raises on a response: empty,
truncated, unknown words or a missing answer line are reported in
``Verification.problems`` and scored as such.

Metrics, each in [0, 1]:
- ``correct``: the stated answer equals the gold answer.
- ``factuality``: the fraction of the rationale's perception sentences that
  are true claims about the scene (a sentence that parses as no claim counts as
  untrue); a rationale with no perception sentence is scored on its conclusion.
- ``completeness``: the fraction of the scene's objects the rationale correctly
  mentions.
- ``consistency``: the stated answer is what the rationale's own claims imply,
  whether or not those claims are true: every reasoning step follows, its
  perceived objects imply the answer, and its conclusion sentence about the
  question's subject copies the last step's state and states the answer. A
  rationale with no such conclusion (none, or one about another subject) does
  not reach its answer, so it is not consistent with it.

Three kinds of error are kept apart (``scenes`` describes the local steps):

- a false perception sentence is a **factuality** error;
- a step whose state does not follow from the object it lists and the state
  before it (or whose checks of that object are wrong), or a conclusion that
  does not copy the last state, is a **reasoning** error, against consistency;
- an answer line that differs from the conclusion is an **alignment** error.

The anatomy of a response says where an error comes from: whether its listing
of the scene is exact (``exact_listing``), whether every step follows
(``steps_follow``), whether its conclusion follows from what it listed
(``listing_answer`` against ``conclusion``), and whether its answer line is its
conclusion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from .scenes import (
    COLORS,
    COLUMNS,
    DOMAIN_WORDS,
    NUMBER_WORDS,
    ROWS,
    SHAPES,
    Question,
    Scene,
    SceneObject,
    answer_question,
    conclusion_from_state,
    count_objects,
    initial_state,
    next_state,
    state_answer,
    step_clause,
)

_WORD = re.compile(r"[a-z]+|[.?:!,]")
_PLURALS = {f"{s}s": s for s in SHAPES}


@dataclass(frozen=True)
class Claim:
    kind: str  # "object", "count", "exists", "attribute", "position", "unparsed"
    text: str
    true: bool
    fields: tuple = ()
    clause: str | None = None  # an object claim's reasoning step: the words after its comma, if any


@dataclass
class Verification:
    answer: str | None
    correct: float
    factuality: float
    completeness: float
    consistency: float
    claims: list[Claim] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    exact_listing: bool = False  # the perception sentences list the scene's objects exactly, each once, nothing else
    listing_answer: str | None = None  # the answer the listed objects imply (true or not)
    conclusion: str | None = None  # the answer the conclusion sentence commits to, if it has one about the question
    steps_follow: bool = False  # each listed object carries a step whose state follows from it and the one before
    steps_answer: str | None = None  # the answer the last step's stated state commits to
    conclusion_copies_state: bool = False  # the conclusion sentence states the last step's state, word for word

    @property
    def conclusion_follows_listing(self) -> bool:
        return self.conclusion is not None and self.conclusion == self.listing_answer

    @property
    def conclusion_follows_steps(self) -> bool:
        return self.conclusion is not None and self.conclusion_copies_state

    @property
    def answer_is_conclusion(self) -> bool:
        return self.answer is not None and self.answer == self.conclusion

    def metrics(self) -> dict[str, float]:
        return {
            "correct": self.correct,
            "factuality": self.factuality,
            "completeness": self.completeness,
            "consistency": self.consistency,
        }


def split_response(response: str) -> tuple[str, str | None]:
    """(rationale, answer); the answer is the text after the last ``Answer:``, or None."""
    matches = list(re.finditer(r"answer\s*:", response, re.IGNORECASE))
    if not matches:
        return response, None
    last = matches[-1]
    return response[: last.start()], (normalize_answer(response[last.end() :]) or None)


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no trailing full stop: how answers are compared."""
    return " ".join(text.split()).lower().strip(" .")


def _sentences(rationale: str) -> list[list[str]]:
    words = _WORD.findall(rationale.lower())
    out, current = [], []
    for w in words:
        if w in ".?!":
            if current:
                out.append(current)
            current = []
        else:
            current.append(w)
    if current:
        out.append(current)
    return out


def _position(words) -> str | None:
    if len(words) == 2 and words[0] in ROWS and words[1] in COLUMNS:
        return f"{words[0]} {words[1]}"
    return None


def _number(word) -> int | None:
    return NUMBER_WORDS.index(word) if word in NUMBER_WORDS else None


def _subject(words) -> tuple[str | None, str | None] | None:
    """``red shapes`` -> (red, None); ``circles`` -> (None, circle)."""
    if len(words) == 2 and words[0] in COLORS and words[1] == "shapes":
        return words[0], None
    if len(words) == 1 and words[0] in _PLURALS:
        return None, _PLURALS[words[0]]
    return None


def _split_clause(words: list[str]) -> tuple[list[str], str | None]:
    """A sentence's claim and its reasoning step: the words before and after its first comma."""
    if "," not in words:
        return words, None
    i = words.index(",")
    return words[:i], " ".join(words[i + 1 :])


def _stated_state(question: Question, clause: str):
    """The state a step clause states, read from its last words (its checks are compared by ``step_clause``);
    None when the clause states no state of this question's kind."""
    w = clause.split()
    if question.kind == "count" and len(w) >= 1 and w[-1] in NUMBER_WORDS:
        return NUMBER_WORDS.index(w[-1])
    if question.kind == "compare" and len(w) == 6 and w[2] in NUMBER_WORDS and w[5] in NUMBER_WORDS:
        return NUMBER_WORDS.index(w[2]), NUMBER_WORDS.index(w[5])
    if question.kind == "exists" and w[-2:] in (["found", "yes"], ["found", "no"]):
        return w[-1] == "yes"
    if question.kind == "attribute" and len(w) == 2 and w[0] == "color" and (w[1] in COLORS or w[1] == "none"):
        return None if w[1] == "none" else w[1]
    if question.kind == "position" and "place" in w:
        rest = w[w.index("place") + 1 :]
        if rest == ["none"]:
            return None
        if _position(rest):
            return _position(rest)
    return _NO_STATE


_NO_STATE = object()  # a clause that states no state of the question's kind


def follow_steps(claims: list[Claim], question: Question) -> tuple[bool, object]:
    """Whether every object claim carries a step that follows from its object and the stated state before it,
    and the last stated state. A step is checked locally: a slip early on does not make later steps fail when
    they follow from it, so one slip is one error."""
    state, follows, steps = initial_state(question), True, 0
    for c in claims:
        if c.kind != "object":
            continue
        steps += 1
        o = SceneObject(c.fields[0], c.fields[1], *c.fields[2].split(" "))
        expected = next_state(question, o, state)
        stated = _stated_state(question, c.clause) if c.clause is not None else _NO_STATE
        if stated is _NO_STATE or c.clause != step_clause(question, o, stated):
            follows, state = False, expected  # no readable state: the next step is checked against the right one
            continue
        follows = follows and stated == expected
        state = stated
    return follows and steps > 0, state


def _parse_sentence(w: list[str]):
    """One sentence's words -> (kind, fields) or None when it is no claim the domain knows."""
    if w[:3] == ["there", "is", "a"] and len(w) == 9 and w[5:7] == ["at", "the"]:
        pos = _position(w[7:9])
        if w[3] in COLORS and w[4] in SHAPES and pos:
            return "object", (w[3], w[4], pos)
    if w[:1] != ["so"]:
        return None
    w = w[1:]
    # so the number of <subject> is <n> [and the number of <subject> is <n>]
    if w[:3] == ["the", "number", "of"]:
        parts, rest = [], w
        while rest[:3] == ["the", "number", "of"] and "is" in rest:
            i = rest.index("is")
            subject, n = _subject(rest[3:i]), _number(rest[i + 1]) if i + 1 < len(rest) else None
            if subject is None or n is None:
                return None
            parts.append((subject, n))
            rest = rest[i + 2 :]
            if rest[:1] == ["and"]:
                rest = rest[1:]
        if rest or not parts:
            return None
        return "count", tuple(parts)
    if w[:2] == ["there", "is"] and len(w) == 5 and w[2] in ("a", "no") and w[3] in COLORS and w[4] in SHAPES:
        return "exists", (w[3], w[4], w[2] == "a")
    if w[:4] == ["the", "shape", "at", "the"] and len(w) == 8 and w[6] == "is":
        pos = _position(w[4:6])
        if pos and w[7] in COLORS:
            return "attribute", (pos, w[7])
    if len(w) == 8 and w[0] == "the" and w[1] in COLORS and w[2] in SHAPES and w[3:6] == ["is", "at", "the"]:
        pos = _position(w[6:8])
        if pos:
            return "position", (w[1], w[2], pos)
    return None


def _claim_true(kind, fields, objects) -> bool:
    if kind == "object":
        color, shape, pos = fields
        return any(o.color == color and o.shape == shape and o.position == pos for o in objects)
    if kind == "count":
        return all(count_objects(objects, color, shape) == n for (color, shape), n in fields)
    if kind == "exists":
        color, shape, present = fields
        return (count_objects(objects, color, shape) > 0) == present
    if kind == "attribute":
        pos, color = fields
        return any(o.position == pos and o.color == color for o in objects)
    if kind == "position":
        color, shape, pos = fields
        return [o.position for o in objects if o.color == color and o.shape == shape] == [pos]
    return False


def _implied_by_conclusion(claim: Claim, q: Question) -> str | None:
    """The answer a conclusion sentence commits to, if it is about the question's subject."""
    if claim.kind == "count":
        counts = dict(claim.fields)
        if q.kind == "count" and (q.color, q.shape) in counts:
            return NUMBER_WORDS[counts[(q.color, q.shape)]]
        if q.kind == "compare" and (q.color, None) in counts and (q.other_color, None) in counts:
            return "yes" if counts[(q.color, None)] > counts[(q.other_color, None)] else "no"
    if claim.kind == "exists" and q.kind == "exists" and claim.fields[:2] == (q.color, q.shape):
        return "yes" if claim.fields[2] else "no"
    if claim.kind == "attribute" and q.kind == "attribute" and claim.fields[0] == q.position:
        return claim.fields[1]
    if claim.kind == "position" and q.kind == "position" and claim.fields[:2] == (q.color, q.shape):
        return claim.fields[2]
    return None


def verify(response: str | None, scene: Scene, question: Question) -> Verification:
    problems: list[str] = []
    if not isinstance(response, str) or not response.strip():
        return Verification(None, 0.0, 0.0, 0.0, 0.0, [], ["empty response"])

    rationale, answer = split_response(response)
    if answer is None:
        problems.append("no answer line")
    unknown = sorted({w for w in re.findall(r"[A-Za-z]+", response) if w.lower() not in _KNOWN_WORDS})
    if unknown:
        problems.append(f"unknown words: {' '.join(unknown[:10])}")

    claims = _claims(rationale, scene)
    if any(c.kind == "unparsed" for c in claims):
        problems.append("unparseable sentence")

    gold = answer_question(scene.objects, question)
    correct = float(answer is not None and answer == gold)
    # Perception is what factuality scores: a conclusion that does not follow is a reasoning error, counted
    # against consistency. A rationale that is only a conclusion (a direct answer) is scored on it.
    perceived = [c for c in claims if c.kind in ("object", "unparsed")] or claims
    factuality = sum(c.true for c in perceived) / len(perceived) if perceived else 0.0

    mentioned = {c.fields for c in claims if c.kind == "object" and c.true}
    completeness = len(mentioned) / len(scene.objects) if scene.objects else 1.0

    claimed_objects = [SceneObject(c, s, *p.split(" ")) for c, s, p in (c.fields for c in claims if c.kind == "object")]
    listing_answer = answer_question(claimed_objects, question) if claimed_objects else None
    steps_follow, last_state = follow_steps(claims, question)
    steps_answer = state_answer(question, last_state) if claimed_objects else None
    consistent = answer is not None and steps_follow and listing_answer == answer and steps_answer == answer
    conclusion, copies_state = None, False
    for c in claims:
        implied = _implied_by_conclusion(c, question)
        if implied is not None:
            conclusion = implied
            copies_state = bool(claimed_objects) and c.text == conclusion_from_state(question, last_state).rstrip(".")
            if implied != answer:
                consistent = False
    consistent = consistent and conclusion is not None and copies_state
    if claimed_objects and not steps_follow:
        problems.append("a reasoning step does not follow")
    if not consistent and answer is not None:
        problems.append("answer does not follow from the rationale")
    return Verification(
        answer,
        correct,
        factuality,
        completeness,
        float(consistent),
        claims,
        problems,
        lists_scene_exactly(claims, scene),
        listing_answer,
        conclusion,
        steps_follow,
        steps_answer,
        copies_state,
    )


def _claims(text: str, scene: Scene) -> list[Claim]:
    """Each sentence of ``text`` as a claim about ``scene``; an object claim keeps its reasoning step's clause."""
    claims = []
    for words in _sentences(text):
        main, clause = _split_clause(words)
        parsed = _parse_sentence(main)
        if parsed is None:
            claims.append(Claim("unparsed", " ".join(words), False))
        else:
            kind, fields = parsed
            clause = clause if kind == "object" else None
            claims.append(Claim(kind, " ".join(words), _claim_true(kind, fields, scene.objects), fields, clause))
    return claims


def lists_scene_exactly(claims: list[Claim], scene: Scene) -> bool:
    """The object claims are the scene's objects, each once, with nothing else claimed about what is there."""
    listed = sorted(c.fields for c in claims if c.kind == "object")
    return listed == sorted((o.color, o.shape, o.position) for o in scene.objects)


def verify_caption(caption: str | None, scene: Scene) -> tuple[float, bool]:
    """A base-stage caption's (factuality, exact listing): the share of its sentences that are true object claims,
    and whether it lists the scene exactly with no other sentence."""
    claims = [c if c.kind == "object" else replace(c, true=False) for c in _claims(caption or "", scene)]
    factuality = sum(c.true for c in claims) / len(claims) if claims else 0.0
    plain = all(c.kind == "object" and c.clause is None for c in claims)  # a caption is a listing, no reasoning
    return factuality, bool(claims) and plain and lists_scene_exactly(claims, scene)


_KNOWN_WORDS = {w.lower() for w in DOMAIN_WORDS}


# --- The oracle: the verifier as a judge -------------------------------------------------------------------------
# It scores a response by quality = weighted correctness + factuality + consistency, and prefers the better of two
# unless the gap is within a tie margin. It is the teacher that labels the judge's training pairs, the bar a
# learned judge is measured against (``judge_agreement``), and with ``judge_model=verifier`` the judge itself: the
# oracle bound of what the rest of the loop can do.

VERIFIER_JUDGE = "verifier"  # the judge_model value that makes the verifier the judge
VERDICT_VALUE = {"A": 1.0, "B": 0.0, "tie": 0.5}  # p(first beats second) that each verdict stands for
QUALITY_WEIGHTS = (2.0, 1.0, 2.0)  # correctness, factuality, consistency
TIE_MARGIN = 0.5


def check_scenes_to_judge(rows, what: str) -> None:
    """The verifier judges each prompt from its scene: ``ValueError`` naming a row of ``rows`` without one, so that
    a run stops before anything trains (and ``evaluate`` before it generates) rather than at its first judgement."""
    bare = rows.filter(rows["scene"].is_null() | rows["question_spec"].is_null())
    if bare.height:
        raise ValueError(
            f"the verifier judges each prompt from its scene, and {bare.height} of the {rows.height} "
            f"{what} have none (e.g. id {bare['id'][0]!r}): judge with an LM instead (a directory or hub id: "
            f"judge_model for a run, --judge for evaluate), or train one on a judgement table (README: A judge "
            f"for your data)"
        )


def quality(v: Verification, weights=QUALITY_WEIGHTS) -> float:
    return weights[0] * v.correct + weights[1] * v.factuality + weights[2] * v.consistency


def response_quality(response: str, scene_json: str, question_json: str, weights=QUALITY_WEIGHTS) -> float:
    """The teacher's score of one response: weighted answer correctness, rationale factuality and consistency."""
    return quality(verify(response, Scene.from_json(scene_json), Question.from_json(question_json)), weights)


def verifier_verdict(quality_first: float, quality_second: float, tie_margin: float = TIE_MARGIN) -> str:
    """The teacher's verdict on an ordered pair: the better quality wins unless the gap is within ``tie_margin``."""
    gap = quality_first - quality_second
    return "A" if gap > tie_margin else "B" if gap < -tie_margin else "tie"


def candidates_per_prompt(candidates, prompts):
    """(prompt id, prompt row, candidate texts in candidate order) for each prompt, in the prompts' order."""
    by_prompt = {pid: g.sort("candidate")["text"].to_list() for (pid,), g in candidates.group_by("prompt_id")}
    for row in prompts.iter_rows(named=True):
        yield row["id"], row, by_prompt.get(row["id"], [])


def verifier_matrices(candidates, prompts, weights=QUALITY_WEIGHTS, tie_margin: float = TIE_MARGIN):
    """The oracle judge's matrices: ``p_ij`` is 1, 0 or 1/2 as the verifier's verdict on (i, j) is A, B or tie.

    It needs each prompt's ``scene`` and ``question_spec``; a prompt without them is an error."""
    ids, matrices = [], []
    for pid, row, cands in candidates_per_prompt(candidates, prompts):
        if row["scene"] is None or row["question_spec"] is None:
            raise ValueError(f"prompt {pid!r} has no scene: the verifier judge works only on the synthetic domain")
        q = [response_quality(c, row["scene"], row["question_spec"], weights) for c in cands]
        ids.append(pid)
        matrices.append(
            [
                [0.5 if i == j else VERDICT_VALUE[verifier_verdict(qi, qj, tie_margin)] for j, qj in enumerate(q)]
                for i, qi in enumerate(q)
            ]
        )
    return ids, matrices


def judge_agreement(
    prompt_ids, q_matrices, candidates, prompts, weights=QUALITY_WEIGHTS, tie_margin=TIE_MARGIN
) -> dict:
    """How often the debiased judgement ``q_ij`` sides with the verifier on pairs the verifier does not call a tie.

    Returns the agreement (NaN when no prompt has a scene or no pair is clear), the number of clear pairs, and
    the agreement of the trivial judge that always prefers the correct answer (the bar a judge must clear).
    """
    truth = {r["id"]: r for r in prompts.select("id", "scene", "question_spec", "answer").iter_rows(named=True)}
    by_prompt = {pid: g.sort("candidate") for (pid,), g in candidates.group_by("prompt_id")}
    agree = answer_agree = clear = 0
    for pid, q in zip(prompt_ids, q_matrices):
        t, group = truth.get(pid), by_prompt.get(pid)
        if t is None or t["scene"] is None or group is None:
            continue
        scene, question = Scene.from_json(t["scene"]), Question.from_json(t["question_spec"])
        checked = [verify(x, scene, question) for x in group["text"].to_list()]
        scores = [quality(v, weights) for v in checked]
        correct = [v.correct for v in checked]
        for i in range(len(checked)):
            for j in range(len(checked)):
                verdict = "tie" if i == j else verifier_verdict(scores[i], scores[j], tie_margin)
                if verdict == "tie":
                    continue
                clear += 1
                agree += (q[i][j] > 0.5) == (verdict == "A")
                answer_agree += (correct[i] > correct[j]) if verdict == "A" else (correct[j] > correct[i])
    nan = float("nan")
    return {
        "judge_agreement": agree / clear if clear else nan,
        "clear_pairs": clear,
        "answer_only_agreement": answer_agree / clear if clear else nan,
    }


def verifier_win_rate(
    eval_set, new: list[str], old: list[str], weights=QUALITY_WEIGHTS, tie_margin=TIE_MARGIN
) -> float:
    """The oracle judge's win rate of ``new`` over ``old``: 1, 0 or 1/2 per prompt as the verifier's verdict goes."""
    rows = eval_set.select("scene", "question_spec").iter_rows(named=True)
    wins = [
        VERDICT_VALUE[
            verifier_verdict(
                response_quality(n, r["scene"], r["question_spec"], weights),
                response_quality(o, r["scene"], r["question_spec"], weights),
                tie_margin,
            )
        ]
        for r, n, o in zip(rows, new, old)
        if r["scene"] is not None
    ]
    return sum(wins) / len(wins) if wins else float("nan")
