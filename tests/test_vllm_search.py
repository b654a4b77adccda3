"""The vLLM search backend: its beam search against a stand-in engine with vLLM's interface (vLLM's PyPI build
pulls the CUDA libraries, so it is not installed on this CPU machine), and against real vLLM on the tiny policy
where vLLM is installed."""

import random
import sys
import types
from dataclasses import dataclass, field

import polars as pl
import pytest

from src_assets.candidate_search import POOL_SCHEMA, SearchConfig
from src_assets.source_data import synthetic_source

SENTENCES = ["there is a red circle at the top left.", "there is a blue square at the middle.", "so it is red."]


@dataclass
class _Sample:
    text: str
    token_ids: list
    cumulative_logprob: float
    finish_reason: str
    stop_reason: object = None


@dataclass
class _Result:
    outputs: list = field(default_factory=list)


class StandInEngine:
    """vLLM's ``LLM.generate`` interface: each request's samples come from its own seed, as vLLM's do; a response
    ends (end-of-sequence, no stop string) after two or three sentences."""

    def __init__(self):
        self.requests = []

    def generate(self, requests, params, use_tqdm=False):
        params = params if isinstance(params, list) else [params] * len(requests)
        results = []
        for request, p in zip(requests, params):
            self.requests.append((request["prompt"], p.seed, p.n))
            rng = random.Random(f"{request['prompt']}/{p.seed}")
            done = request["prompt"].count(".")
            samples = []
            for _ in range(p.n):
                if p.stop is None:  # greedy: the whole response at once
                    samples.append(_Sample(SENTENCES[0] + " " + SENTENCES[2] + "\nAnswer: red", [1] * 12, -3.0, "stop"))
                elif done >= 2 and rng.random() < 0.7:
                    samples.append(_Sample(" Answer: red", [1, 2], rng.uniform(-2, 0), "stop", None))
                else:
                    sentence = " " + rng.choice(SENTENCES)
                    samples.append(_Sample(sentence, [1] * 8, rng.uniform(-8, -1), "stop", "."))
            results.append(_Result(samples))
        return results


@pytest.fixture
def stand_in_vllm(monkeypatch):
    module = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    module.SamplingParams = SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)


class _Processor:
    class tokenizer:
        eos_token_id = 2

    @staticmethod
    def apply_chat_template(messages, add_generation_prompt=True):
        return f"USER: {messages[0]['content'][1]['text']} ASSISTANT:"


def test_vllm_beam_search_gives_the_pool_schema_and_per_prompt_streams(stand_in_vllm):
    from src_assets.vllm_search import vllm_beam_search

    prompts = synthetic_source(seed=2, n_sft=0, n_calibrate=4, n_eval=0)
    cfg = SearchConfig(k=3, beams=2, samples_per_beam=3, max_sentences=5, backend="vllm")
    engine = StandInEngine()
    pool = vllm_beam_search(engine, _Processor(), prompts, cfg, seed=7)
    assert pool.schema == pl.Schema(POOL_SCHEMA)
    counts = pool.group_by("prompt_id").len()
    assert counts["len"].max() <= 3 and set(counts["prompt_id"]) == set(prompts["id"])
    assert pool.filter(pl.col("answer").is_null()).is_empty()  # every candidate ended with its Answer line
    assert pool.group_by("prompt_id").agg(pl.col("text").n_unique() == pl.len())["text"].all()  # distinct
    assert all(n == 3 for _, _, n in engine.requests if n != 1)  # samples_per_beam samples per beam request
    # A prompt searched alone gets the same candidates: its requests' seeds come from its id, not its position.
    alone = vllm_beam_search(StandInEngine(), _Processor(), prompts.slice(2, 1), cfg, seed=7)
    assert alone.equals(pool.filter(pl.col("prompt_id") == prompts["id"][2]))


def test_vllm_on_the_tiny_policy_where_vllm_is_installed(tmp_path):
    pytest.importorskip(
        "vllm",
        reason="vLLM is not installed: its PyPI build pulls the CUDA libraries; the stand-in test covers the search",
    )
    from src_assets.processors import load_processor
    from src_assets.tiny_models import TinySpec, build_tiny_policy
    from src_assets.vllm_search import load_vllm, vllm_beam_search

    policy = str(build_tiny_policy(tmp_path / "policy", "llava", TinySpec()))
    prompts = synthetic_source(seed=2, n_sft=0, n_calibrate=2, n_eval=0)
    pool = vllm_beam_search(load_vllm(policy), load_processor(policy), prompts, SearchConfig(backend="vllm"), seed=1)
    assert pool.schema == pl.Schema(POOL_SCHEMA)
