"""The embedded synthetic visual-reasoning domain.

Scenes are a few coloured shapes on a 3x3 grid, drawn with Pillow and generated
deterministically from a seed. Every question has a machine-checkable gold
response in the rationale template, so the verifier in ``verifier.py`` can
score any response against the scene.

The rationale is written as local steps. Each perception sentence lists one
object and then carries the question's running state after that object (a
tally, a found flag, the colour or the cell seen so far), and the conclusion
copies the last state::

    there is a red circle at the top left, red count one. there is a blue square
    at the middle center, red count one. so the number of red shapes is one.
    Answer: one

For a question about a colour and a shape, each attribute is checked on its own
before the state (``blue yes triangle no, found no``). Every step then depends
only on the object just written, the question and the previous step, which a
2-layer decoder learns; a conclusion that aggregates over a whole listing it
does not (docs/method.md). Captions and the judge's reference stay plain
listings: a state belongs to a question.

Words are lower case and come from a closed vocabulary (``DOMAIN_WORDS``), which
is what lets the tiny models use a word-level tokenizer.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION_KINDS = ("count", "exists", "attribute", "position", "compare")

_RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
BACKGROUND = (245, 245, 245)
CELL_PIXELS = 16
IMAGE_PIXELS = CELL_PIXELS * 3


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    row: str
    column: str

    @property
    def position(self) -> str:
        return f"{self.row} {self.column}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]

    def to_json(self) -> str:
        return json.dumps([asdict(o) for o in self.objects])

    @classmethod
    def from_json(cls, text: str) -> "Scene":
        return cls(tuple(SceneObject(**o) for o in json.loads(text)))


@dataclass(frozen=True)
class Question:
    """A question as structured fields; ``text`` renders it, ``answer_question`` answers it."""

    kind: str
    color: str | None = None
    shape: str | None = None
    position: str | None = None
    other_color: str | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None})

    @classmethod
    def from_json(cls, text: str) -> "Question":
        fields = json.loads(text)
        if fields.get("kind") not in QUESTION_KINDS:
            raise ValueError(f"unknown question kind {fields.get('kind')!r}; expected one of {QUESTION_KINDS}")
        return cls(**fields)

    @property
    def text(self) -> str:
        if self.kind == "count":
            subject = f"{self.color} shapes" if self.color else f"{self.shape}s"
            return f"how many {subject} are there?"
        if self.kind == "exists":
            return f"is there a {self.color} {self.shape}?"
        if self.kind == "attribute":
            return f"what color is the shape at the {self.position}?"
        if self.kind == "position":
            return f"where is the {self.color} {self.shape}?"
        if self.kind == "compare":
            return f"are there more {self.color} shapes than {self.other_color} shapes?"
        raise ValueError(f"unknown question kind {self.kind!r}")


def count_objects(objects, color=None, shape=None) -> int:
    return sum(1 for o in objects if (color is None or o.color == color) and (shape is None or o.shape == shape))


def answer_question(objects, question: Question) -> str | None:
    """The answer that follows from ``objects``, or None when they do not determine one.

    Used on the true scene (gold answer) and on the objects a response claims
    (the answer its own rationale implies), which is what consistency compares.
    """
    if question.kind == "count":
        n = count_objects(objects, question.color, question.shape)
        return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else None
    if question.kind == "exists":
        return "yes" if count_objects(objects, question.color, question.shape) else "no"
    if question.kind == "attribute":
        colors = {o.color for o in objects if o.position == question.position}
        return colors.pop() if len(colors) == 1 else None
    if question.kind == "position":
        places = {o.position for o in objects if o.color == question.color and o.shape == question.shape}
        return places.pop() if len(places) == 1 else None
    if question.kind == "compare":
        return "yes" if count_objects(objects, question.color) > count_objects(objects, question.other_color) else "no"
    raise ValueError(f"unknown question kind {question.kind!r}")


def perception_sentence(o: SceneObject) -> str:
    return f"there is a {o.color} {o.shape} at the {o.position}."


# --- Local reasoning steps ----------------------------------------------------------------------------------------
# A question's running state over the listed objects: a tally (count), two tallies (compare), a found flag
# (exists), the colour seen at the asked cell (attribute) or the cell of the asked object (position).


def initial_state(question: Question):
    """The state before any object is listed."""
    return {"count": 0, "compare": (0, 0), "exists": False, "attribute": None, "position": None}[question.kind]


def next_state(question: Question, o: SceneObject, state):
    """The state after ``o`` is listed, from ``o``, the question and the previous ``state`` alone."""
    q = question
    if q.kind == "count":
        return state + ((q.color is None or o.color == q.color) and (q.shape is None or o.shape == q.shape))
    if q.kind == "compare":
        return (state[0] + (o.color == q.color), state[1] + (o.color == q.other_color))
    if q.kind == "exists":
        return state or (o.color == q.color and o.shape == q.shape)
    if q.kind == "attribute":
        return o.color if o.position == q.position else state
    if q.kind == "position":
        return o.position if o.color == q.color and o.shape == q.shape else state
    raise ValueError(f"unknown question kind {q.kind!r}")


def state_answer(question: Question, state) -> str | None:
    """The answer a final state commits to (None: no answer, e.g. the asked cell was never listed)."""
    q = question
    if q.kind == "count":
        return NUMBER_WORDS[state] if 0 <= state < len(NUMBER_WORDS) else None
    if q.kind == "compare":
        return "yes" if state[0] > state[1] else "no"
    if q.kind == "exists":
        return "yes" if state else "no"
    return state


def _word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def step_clause(question: Question, o: SceneObject, state) -> str:
    """What follows a perception sentence's comma: the checks of ``o`` against the question (for a colour and a
    shape, each on its own), then ``state``, the state after ``o``."""
    q = question
    if q.kind == "count":
        return f"{q.color or q.shape} count {_word(state)}"
    if q.kind == "compare":
        return f"{q.color} count {_word(state[0])} {q.other_color} count {_word(state[1])}"
    checks = f"{q.color} {'yes' if o.color == q.color else 'no'} {q.shape} {'yes' if o.shape == q.shape else 'no'}"
    if q.kind == "exists":
        return f"{checks} found {'yes' if state else 'no'}"
    if q.kind == "attribute":
        return f"color {state or 'none'}"
    if q.kind == "position":
        return f"{checks} place {state or 'none'}"
    raise ValueError(f"unknown question kind {q.kind!r}")


def step_sentence(question: Question, o: SceneObject, state) -> str:
    """A reasoning step: the perception sentence of ``o`` carrying the state after it."""
    return f"there is a {o.color} {o.shape} at the {o.position}, {step_clause(question, o, state)}."


def reasoning_steps(objects, question: Question, slip_at: int | None = None, rng: random.Random | None = None):
    """The step sentences over ``objects`` and the final state. With ``slip_at``, the state after that object is a
    wrong one (``slipped_state``), and every later step follows locally from it: a reasoning slip."""
    state, sentences = initial_state(question), []
    for i, o in enumerate(objects):
        state = next_state(question, o, state)
        if i == slip_at:
            state = slipped_state(question, state, rng or random.Random(0))
        sentences.append(step_sentence(question, o, state))
    return sentences, state


def conclusion_sentence(objects, question: Question) -> str:
    """The reasoning sentence that links the perceived objects to the answer: the last state, copied."""
    return conclusion_from_state(question, reasoning_steps(objects, question)[1])


def conclusion_from_state(question: Question, state) -> str:
    """The reasoning sentence that copies the last state (``conclusion_sentence`` of the objects it stands for)."""
    q = question
    if q.kind == "count":
        subject = f"{q.color} shapes" if q.color else f"{q.shape}s"
        return f"so the number of {subject} is {_word(state)}."
    if q.kind == "compare":
        return (
            f"so the number of {q.color} shapes is {_word(state[0])} "
            f"and the number of {q.other_color} shapes is {_word(state[1])}."
        )
    if q.kind == "exists":
        return f"so there is {'a' if state else 'no'} {q.color} {q.shape}."
    if q.kind == "attribute":
        return f"so the shape at the {q.position} is {state or 'none'}."
    if q.kind == "position":
        return f"so the {q.color} {q.shape} is at the {state or 'none'}."
    raise ValueError(f"unknown question kind {q.kind!r}")


def slipped_state(question: Question, state, rng: random.Random):
    """A wrong state in place of ``state``: a tally off by one, a flipped flag, another colour or cell."""
    q = question
    if q.kind == "count":
        return state + 1 if state == 0 or rng.random() < 0.5 else state - 1
    if q.kind == "compare":
        i = rng.randrange(2)
        n = state[i] + 1 if state[i] == 0 or rng.random() < 0.5 else state[i] - 1
        return (n, state[1]) if i == 0 else (state[0], n)
    if q.kind == "exists":
        return not state
    if q.kind == "attribute":
        return rng.choice([c for c in COLORS if c != state])
    cells = [f"{r} {c}" for r in ROWS for c in COLUMNS]
    return rng.choice([c for c in cells if c != state])


def rationale_response(objects, question: Question, answer: str | None, slip_at=None, rng=None) -> str:
    """A response in the rationale template reasoning over ``objects`` (the scene, or what a teacher saw) by local
    steps, its conclusion the last state, and ``answer`` on the answer line."""
    sentences, state = reasoning_steps(objects, question, slip_at, rng)
    return " ".join([*sentences, conclusion_from_state(question, state)]) + f"\nAnswer: {answer}"


def gold_response(scene: Scene, question: Question) -> str:
    return rationale_response(scene.objects, question, answer_question(scene.objects, question))


def describe_scene(scene: Scene) -> str:
    """A reference description of the image, as the judge reads it; also the base stage's caption."""
    return " ".join(perception_sentence(o) for o in scene.objects)


# The base stage's captioning prompt: its answer lists the scene in the rationale's own perception sentences.
CAPTION_QUESTION = "describe the image."


def misperceived(scene: Scene, rng: random.Random) -> Scene:
    """``scene`` as a fallible teacher sees it: one object with its colour or its shape mistaken."""
    i = rng.randrange(len(scene.objects))
    o = scene.objects[i]
    if rng.random() < 0.5:
        o = SceneObject(rng.choice([c for c in COLORS if c != o.color]), o.shape, o.row, o.column)
    else:
        o = SceneObject(o.color, rng.choice([s for s in SHAPES if s != o.shape]), o.row, o.column)
    return Scene(scene.objects[:i] + (o,) + scene.objects[i + 1 :])


def teacher_response(
    scene: Scene, question: Question, rng: random.Random, error_rate: float = 0.0, slip_rate: float = 0.0
) -> str:
    """A rationale SFT target as a teacher model writes one, the answer line always the dataset's gold label:

    - with probability ``error_rate`` it misperceives one object and reasons from what it saw: one sentence is
      untrue and, when the mistake matters to the question, the answer no longer follows from the rationale;
    - with probability ``slip_rate`` one state slips (``slipped_state``) and the steps after it follow from the
      slip: a reasoning error, and an answer that may no longer follow.
    """
    gold = answer_question(scene.objects, question)
    objects = scene.objects
    if error_rate > 0 and rng.random() < error_rate:
        seen = misperceived(scene, rng)
        if answer_question(seen.objects, question) is None:  # e.g. "where is the red circle?" after it was seen blue
            seen = misperceived(scene, rng)
        if answer_question(seen.objects, question) is not None:
            objects = seen.objects
    slip_at = rng.randrange(len(objects)) if slip_rate > 0 and rng.random() < slip_rate and objects else None
    return rationale_response(objects, question, gold, slip_at, rng)


def generate_scene(rng: random.Random, min_objects: int = 2, max_objects: int = 5) -> Scene:
    cells = [(r, c) for r in ROWS for c in COLUMNS]
    chosen = rng.sample(cells, rng.randint(min_objects, max_objects))
    # Reading order, so the gold rationale lists objects the way the image is scanned.
    chosen.sort(key=lambda rc: (ROWS.index(rc[0]), COLUMNS.index(rc[1])))
    return Scene(tuple(SceneObject(rng.choice(COLORS), rng.choice(SHAPES), r, c) for r, c in chosen))


def generate_question(rng: random.Random, scene: Scene, kind: str) -> Question | None:
    """A question of ``kind`` about ``scene``, or None when the scene cannot pose one."""
    objs = scene.objects
    if kind == "count":
        if rng.random() < 0.5:
            return Question("count", color=rng.choice(COLORS))
        return Question("count", shape=rng.choice(SHAPES))
    if kind == "exists":
        # Half the time ask about an object that is there, so "yes" is not rare.
        if rng.random() < 0.5:
            o = rng.choice(objs)
            return Question("exists", color=o.color, shape=o.shape)
        return Question("exists", color=rng.choice(COLORS), shape=rng.choice(SHAPES))
    if kind == "attribute":
        return Question("attribute", position=rng.choice(objs).position)
    if kind == "position":
        unique = [o for o in objs if count_objects(objs, o.color, o.shape) == 1]
        if not unique:  # every object has a twin, so "where is the ..." has no single answer
            return None
        o = rng.choice(unique)
        return Question("position", color=o.color, shape=o.shape)
    if kind == "compare":
        c1, c2 = rng.sample(COLORS, 2)
        return Question("compare", color=c1, other_color=c2)
    raise ValueError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")


def render_scene(scene: Scene) -> bytes:
    """PNG bytes of the scene; one 16-pixel cell per grid position."""
    image = Image.new("RGB", (IMAGE_PIXELS, IMAGE_PIXELS), BACKGROUND)
    draw = ImageDraw.Draw(image)
    m = 2  # margin inside the cell, so neighbouring shapes never touch
    for o in scene.objects:
        x0 = COLUMNS.index(o.column) * CELL_PIXELS + m
        y0 = ROWS.index(o.row) * CELL_PIXELS + m
        x1, y1 = x0 + CELL_PIXELS - 2 * m - 1, y0 + CELL_PIXELS - 2 * m - 1
        fill = _RGB[o.color]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=fill)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _question_words() -> set[str]:
    texts = []
    for kind in QUESTION_KINDS:
        texts.append(Question(kind, "red", "circle", "top left", "blue").text)
    texts.append(Question("count", shape="circle").text)
    texts += [f"{s}s" for s in SHAPES]
    return set(" ".join(texts).replace("?", " ").split())


def _response_words() -> set[str]:
    o = SceneObject("red", "circle", "top", "left")
    words = set()
    for kind in QUESTION_KINDS:
        q = Question(kind, "red", "circle", "top left", "blue")
        words |= set(conclusion_sentence([o], q).replace(".", " ").split())
    words |= set(perception_sentence(o).replace(".", " ").split())
    words |= {"count", "found", "color", "place", "none"}  # the step clauses' words (``step_clause``)
    return words | {"no", "yes", "a"}


# The closed vocabulary of the domain: every word a question or gold response can contain.
DOMAIN_WORDS: tuple[str, ...] = tuple(
    sorted(
        _question_words()
        | _response_words()
        | set(COLORS)
        | set(SHAPES)
        | set(ROWS)
        | set(COLUMNS)
        | set(NUMBER_WORDS)
        | set(CAPTION_QUESTION.replace(".", " ").split())
        | {"Answer", ".", "?", ":", ","}
    )
)


@dataclass(frozen=True)
class Example:
    id: str
    split: str
    scene: Scene
    question: Question

    def row(self, response: str | None = None) -> dict:
        """The source-table row; ``response`` replaces the gold rationale (e.g. a teacher's flawed one)."""
        return {
            "id": self.id,
            "split": self.split,
            "kind": self.question.kind,
            "question": self.question.text,
            "question_spec": self.question.to_json(),
            "answer": answer_question(self.scene.objects, self.question),
            "response": response or gold_response(self.scene, self.question),
            "reference": describe_scene(self.scene),
            "scene": self.scene.to_json(),
            "image": render_scene(self.scene),
        }


def generate_examples(n: int, seed: int, split: str, kinds=QUESTION_KINDS, min_objects=2, max_objects=5):
    """``n`` examples, the question kinds in equal shares; the same (n, seed, split) gives the same rows."""
    for kind in kinds:
        if kind not in QUESTION_KINDS:
            raise ValueError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")
    # The split name is part of the seed, so splits drawn with one seed never share a stream.
    rng = random.Random(f"{seed}/{split}")
    out = []
    for i in range(n):
        question = None
        while question is None:
            scene = generate_scene(rng, min_objects, max_objects)
            question = generate_question(rng, scene, kinds[i % len(kinds)])
        out.append(Example(f"{split}-{seed}-{i:06d}", split, scene, question))
    return out
