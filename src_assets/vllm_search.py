"""Stage 2 through vLLM (``search_backend=vllm``, where ``vllm`` is installed): the same sentence-level beam search
as ``candidate_search``, with vLLM generating the sentences.

Each step sends every live beam of every prompt as one request (the prompt, its image and the beam's text so far),
asking for ``samples_per_beam`` samples (``n``) that stop at the sentence delimiter; vLLM's prefix caching
reuses the prompt and the beam's shared prefix across steps and samples. The beams are kept by the same
length-normalised log-probability (vLLM's raw log-probs, as the transformers backend records them at temperature 1),
and the table is built by ``candidate_search.pool_table``. Each request's seed comes from its prompt's id, the step
and the beam, so a prompt's samples do not depend on its batch or shard.

vLLM is never required: ``load_vllm`` says how to get it where it is missing. This module has not run with a real
vLLM: its PyPI build pulls the CUDA libraries (and its own torch), so this project's CPU machine does not install
it; the search's control flow is tested against a stand-in engine with vLLM's interface.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import polars as pl

from .candidate_search import SearchConfig, pool_table
from .fingerprints import derive_seed
from .generation import decode_image, generation_prompt


def load_vllm(model_dir: str, runtime=None):
    """A vLLM engine for the policy in ``model_dir``, prefix caching on."""
    try:
        from vllm import LLM
    except ImportError as e:
        raise ImportError(
            "search_backend=vllm needs vLLM (pip install vllm, on a CUDA machine); search_backend=transformers needs "
            "nothing more"
        ) from e
    dtype = "auto" if runtime is None else str(runtime.torch_dtype()).removeprefix("torch.")
    return LLM(model=model_dir, enable_prefix_caching=True, trust_remote_code=False, dtype=dtype)


def _sampling(seed: int, n: int, temperature: float, max_tokens: int, stop: list[str] | None):
    from vllm import SamplingParams

    return SamplingParams(
        n=n,
        temperature=temperature,
        max_tokens=max_tokens,
        stop=stop,
        include_stop_str_in_output=True,
        seed=seed,
        logprobs=0,  # the sampled tokens' own log-probs: cumulative_logprob
    )


def _length_normalised(logprob: float, tokens: int) -> float:
    return logprob / max(tokens, 1)


def vllm_beam_search(llm, processor, prompts: pl.DataFrame, cfg: SearchConfig, seed: int = 0) -> pl.DataFrame:
    """The candidate pool for ``prompts`` (columns ``id``, ``question``, ``image``), up to K rows per prompt."""
    ids = prompts["id"].to_list()
    texts = [generation_prompt(processor, q) for q in prompts["question"].to_list()]
    images = [decode_image(b) for b in prompts["image"].to_list()]
    # A beam: (text so far, summed log-prob, tokens); finished ones are keyed by their text.
    live = [[("", 0.0, 0)] for _ in ids]
    finished: list[dict[str, tuple[float, int]]] = [{} for _ in ids]
    for step in range(cfg.max_sentences):
        requests, params, owners = [], [], []
        for p, beams in enumerate(live):
            for b, (text, logprob, tokens) in enumerate(beams):
                requests.append({"prompt": texts[p] + text, "multi_modal_data": {"image": images[p]}})
                request_seed = derive_seed(seed, "vllm", ids[p], step, b) % 2**31
                params.append(
                    _sampling(
                        request_seed,
                        cfg.samples_per_beam,
                        cfg.temperature,
                        cfg.max_sentence_tokens,
                        [cfg.sentence_delimiter],
                    )
                )
                owners.append((p, text, logprob, tokens))
        if not requests:
            break
        extended: list[dict[str, tuple[float, int]]] = [{} for _ in ids]
        for (p, text, logprob, tokens), result in zip(owners, llm.generate(requests, params, use_tqdm=False)):
            for sample in result.outputs:
                if not sample.text:
                    continue
                new = (text + sample.text, logprob + (sample.cumulative_logprob or 0.0), tokens + len(sample.token_ids))
                # finish_reason "stop" with no stop string: the end-of-sequence token ended the response.
                ended = sample.finish_reason == "stop" and sample.stop_reason in (
                    None,
                    processor.tokenizer.eos_token_id,
                )
                if ended:
                    finished[p].setdefault(new[0], new[1:])
                elif sample.finish_reason == "stop":
                    extended[p].setdefault(new[0], new[1:])
                # "length": a sentence longer than max_sentence_tokens is dropped, as the transformers backend does
        live = [
            sorted(((t, *v) for t, v in e.items()), key=lambda b: -_length_normalised(b[1], b[2]))[: cfg.beams]
            for e in extended
        ]

    if cfg.include_greedy:
        requests = [{"prompt": t, "multi_modal_data": {"image": im}} for t, im in zip(texts, images)]
        greedy = _sampling(seed % 2**31, 1, 0.0, cfg.max_sentences * cfg.max_sentence_tokens, None)
        for p, result in enumerate(llm.generate(requests, greedy, use_tqdm=False)):
            sample = result.outputs[0]
            if sample.finish_reason == "stop" and sample.text:
                finished[p].setdefault(sample.text, (sample.cumulative_logprob or 0.0, len(sample.token_ids)))

    ranked = [
        [(text, *v) for text, v in sorted(pool.items(), key=lambda kv: -_length_normalised(*kv[1])) if text.strip()]
        for pool in finished
    ]
    return pool_table(ids, ranked, cfg.k, json.dumps(asdict(cfg) | {"seed": seed, "backend": "vllm"}))
