"""Stage 2: a diverse pool of complete responses per prompt by sentence-level beam search.

A response grows one sentence at a time. Every live beam is expanded with M
sampled continuations, each stopping at the sentence delimiter (or the end of
the response); of all extensions, duplicates are removed and the best B
unfinished ones by length-normalised log-probability live on. Finished
responses (those that reached the end-of-sequence token) join the prompt's
pool, of which the best K distinct ones are kept.

Prompts advance in groups that fill one batch of rows (prompt x beam x sample):
every step is one batched ``generate`` call. Each prompt and its image are
encoded once per group into a KV cache that every step continues, where the
model's positions allow it (``reuses_prompt_cache``); only the chosen tokens'
log-probs are kept, never a ``[rows, steps, vocabulary]`` tensor.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import polars as pl
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .fingerprints import derive_seed
from .generation import PromptInputs, cache_rows, collate_prompts, left_padded, never_generate, prompt_inputs, to_model
from .progress import Progress, ProgressBar
from .setting import setting, validate_fields
from .verifier import split_response

MAX_CANDIDATES = 256  # a bound that stops a typo, not a limit of the method


@dataclass(frozen=True)
class SearchConfig:
    k: int = setting(6, low=2, high=MAX_CANDIDATES)  # candidates kept per prompt
    beams: int = setting(3, low=1, high=MAX_CANDIDATES)  # B: live partial responses per prompt
    samples_per_beam: int = setting(3, low=1, high=MAX_CANDIDATES)  # M: sentence continuations sampled per beam
    # 1.0 leaves 2-3 distinct candidates per prompt and 4 prompts in 10 all tied
    temperature: float = setting(1.5, above=0)
    max_sentences: int = setting(8, low=1)
    max_sentence_tokens: int = setting(24, low=1)
    # rows (prompt x beam x sample) per generate call
    batch_size: int = setting(512, low=1, name="search_batch_size")
    sentence_delimiter: str = setting(".")
    # The policy's greedy response joins the pool too: it is what the policy answers when asked, so a pair that
    # ranks it against a better sampled candidate corrects exactly the behaviour that gets evaluated.
    include_greedy: bool = setting(True)

    def __post_init__(self):
        validate_fields(self)


@dataclass
class _Beam:
    tokens: tuple[int, ...]
    logprob: float

    @property
    def score(self) -> float:
        return self.logprob / max(len(self.tokens), 1)


class _ChosenTokenLogps(LogitsProcessor):
    """Records each sampled token's log-probability under the model (temperature 1) as generation goes.

    ``generate`` applies user processors before its temperature warper, so ``scores`` here are the model's own
    logits (with forbidden tokens masked). Only the previous step's log-softmax is held, never ``[rows, steps, V]``.
    """

    def __init__(self):
        self.steps: list[torch.Tensor] = []
        self._last: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        if self._last is not None:
            self.steps.append(self._last.gather(1, input_ids[:, -1:]).squeeze(1))
        self._last = scores.float().log_softmax(-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """[rows, new tokens]: the log-probs, once the last sampled tokens are known."""
        if self._last is not None:
            self.steps.append(self._last.gather(1, last_tokens[:, None]).squeeze(1))
        return torch.stack(self.steps, 1) if self.steps else torch.zeros(len(last_tokens), 0)


def _generate(model, batch: dict, pad_id, stop_ids, max_new_tokens: int, sample: bool, temperature: float, cache=None):
    """Continues each row of ``batch``; returns the new token tuples, each cut after its first stop token, and their
    summed log-probs under the model (temperature 1). With ``cache``, its columns are not encoded again."""
    width = batch["input_ids"].shape[1]
    recorder = _ChosenTokenLogps()
    out = model.generate(
        **to_model(batch, model),
        **({"cache": cache} if cache is not None else {}),
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=None,
        top_p=None,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        logits_processor=LogitsProcessorList([recorder]),
        bad_words_ids=never_generate(model),
    )
    new = out[:, width:]
    logps = recorder.finish(new[:, -1]).cpu() if new.shape[1] else torch.zeros(len(new), 0)
    sentences, sums = [], []
    for r in range(new.shape[0]):
        toks = new[r].tolist()
        cut = next((i + 1 for i, t in enumerate(toks) if t in stop_ids), len(toks))
        sentences.append(tuple(toks[:cut]))
        sums.append(float(logps[r, :cut].sum()))
    return sentences, sums


def reuses_prompt_cache(model) -> bool:
    """Whether a prompt's KV cache can be continued with padding between it and a beam's tokens.

    Most decoders take each token's position from the attention mask, so padding holes are harmless. Models with
    multimodal rotary positions (Qwen2-VL, Qwen2.5-VL: ``get_rope_index``) offset positions from the cache length
    instead, which holes would shift; they re-encode the prompt at each sentence step.
    """
    return not any(hasattr(m, "get_rope_index") for m in (model, getattr(model, "model", None)) if m is not None)


class _Prompts:
    """A group of prompts as ``generate`` gets them: re-encoded with their beam's tokens at every call, or, where
    the model allows (``reuses_prompt_cache``), encoded once, images included, into a KV cache that every call
    continues. The cache holds all but each prompt's last token, so every continuation starts with a real token
    and no row ends on padding."""

    def __init__(self, model, rows: list[PromptInputs], pad_id: int):
        self.model, self.rows, self.pad_id, self.cache = model, rows, pad_id, None
        if not reuses_prompt_cache(model):
            return
        batch = collate_prompts(rows, None, pad_id)
        token_keys = {"attention_mask", *rows[0].tokens}
        self.ids, self.mask = batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1]
        self.last = batch["input_ids"][:, -1].tolist()
        prefix = {k: v[:, :-1] if k in token_keys else v for k, v in batch.items()}
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers a left-padded row
        self.cache = model(**to_model(prefix, model), position_ids=positions.to(model.device), use_cache=True).cache

    def batch(self, index: list[int], extra: list[tuple[int, ...]]):
        """The inputs for prompts ``index``, each followed by its ``extra`` tokens, and the cache they continue."""
        if self.cache is None:
            return collate_prompts([self.rows[i] for i in index], extra, self.pad_id), None
        new_ids, new_mask = left_padded([[self.last[i], *e] for i, e in zip(index, extra)], self.pad_id)
        rows = torch.tensor(index)
        batch = {
            "input_ids": torch.cat([self.ids[rows], new_ids], 1),
            "attention_mask": torch.cat([self.mask[rows], new_mask], 1),
        }
        return batch, cache_rows(self.cache, index)


def sentence_stop_ids(tokenizer, delimiter: str) -> set[int]:
    """Every token whose text contains the sentence delimiter, plus end-of-sequence: with a BPE vocabulary a
    sentence can end inside a merged token such as ``".\n"``, so looking up ``"."`` alone would miss it."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.convert_ids_to_tokens(list(vocab.values()))
    found = {
        i
        for i, t in zip(vocab.values(), texts)
        if i not in special and delimiter in tokenizer.convert_tokens_to_string([t])
    }
    return found | {tokenizer.eos_token_id}


def _search_group(model, prompts: _Prompts, n: int, cfg: SearchConfig, eos_id: int, stop_ids: set[int], seed: int):
    """Sentence-level beam search for one group of ``n`` prompts; returns each prompt's finished responses."""
    live: list[list[_Beam]] = [[_Beam((), 0.0)] for _ in range(n)]
    finished: list[dict[tuple, _Beam]] = [{} for _ in range(n)]
    for step in range(cfg.max_sentences):
        rows = [(p, b) for p, beams in enumerate(live) for b in beams for _ in range(cfg.samples_per_beam)]
        if not rows:
            break
        extended: list[dict[tuple, _Beam]] = [{} for _ in range(n)]
        for start in range(0, len(rows), cfg.batch_size):
            chunk = rows[start : start + cfg.batch_size]
            batch, cache = prompts.batch([p for p, _ in chunk], [b.tokens for _, b in chunk])
            torch.manual_seed(derive_seed(seed, "step", step, start))
            sentences, sums = _generate(
                model, batch, prompts.pad_id, stop_ids, cfg.max_sentence_tokens, True, cfg.temperature, cache
            )
            for (p, beam), sentence, logp in zip(chunk, sentences, sums):
                if not sentence:
                    continue
                new = _Beam(beam.tokens + sentence, beam.logprob + logp)
                target = finished[p] if sentence[-1] == eos_id else extended[p]
                target.setdefault(new.tokens, new)
        live = [sorted(ext.values(), key=lambda b: -b.score)[: cfg.beams] for ext in extended]

    if cfg.include_greedy:
        batch, cache = prompts.batch(list(range(n)), [()] * n)
        responses, sums = _generate(
            model, batch, prompts.pad_id, {eos_id}, cfg.max_sentences * cfg.max_sentence_tokens, False, 1.0, cache
        )
        for p, tokens, logp in zip(range(n), responses, sums):
            if tokens and tokens[-1] == eos_id:
                finished[p].setdefault(tokens, _Beam(tokens, logp))
    return finished


@torch.no_grad()
def sentence_beam_search(
    model,
    processor,
    prompts: pl.DataFrame,
    cfg: SearchConfig = SearchConfig(),
    seed: int = 0,
    progress: Progress = True,
) -> pl.DataFrame:
    """The candidate pool for ``prompts`` (columns ``id``, ``question``, ``image``): up to K rows per prompt."""
    model.eval()
    tok = processor.tokenizer
    eos_id, pad_id = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stop_ids = sentence_stop_ids(tok, cfg.sentence_delimiter)

    ids, questions, images = prompts["id"].to_list(), prompts["question"].to_list(), prompts["image"].to_list()
    finished: list[dict[tuple, _Beam]] = []
    # Prompts go in groups whose rows (prompt x beam x sample) fill one generate call, so that one group's prompt
    # cache is all that is held at a time.
    group = max(1, cfg.batch_size // (cfg.beams * cfg.samples_per_beam))
    bar = ProgressBar(len(ids), "candidate search (prompts)", progress)
    for g0 in range(0, len(ids), group):
        inputs = [
            prompt_inputs(processor, q, image) for q, image in zip(questions[g0 : g0 + group], images[g0 : g0 + group])
        ]
        finished += _search_group(
            model,
            _Prompts(model, inputs, pad_id),
            len(inputs),
            cfg,
            eos_id,
            stop_ids,
            # From the group's first prompt id, not its position: a prompt searched alone draws the same samples
            # whichever shard or batch it is in.
            derive_seed(seed, "group", ids[g0]),
        )
        bar.update(len(inputs))
    bar.close()

    params = json.dumps(asdict(cfg) | {"seed": seed})
    out = []
    for pid, pool in zip(ids, finished):
        best = sorted(pool.values(), key=lambda b: -b.score)
        seen_texts = set()
        for beam in best:
            text = tok.decode(list(beam.tokens), skip_special_tokens=True).strip()
            if text in seen_texts:  # distinct token sequences can decode alike
                continue
            seen_texts.add(text)
            rationale, answer = split_response(text)
            out.append(
                {
                    "prompt_id": pid,
                    "candidate": len(seen_texts) - 1,
                    "text": text,
                    "rationale": rationale.strip(),
                    "answer": answer,
                    "logprob": beam.logprob,
                    "n_tokens": len(beam.tokens),
                    "params": params,
                }
            )
            if len(seen_texts) == cfg.k:
                break
    return pl.DataFrame(out, schema=POOL_SCHEMA)


POOL_SCHEMA = {
    "prompt_id": pl.String,
    "candidate": pl.Int64,
    "text": pl.String,
    "rationale": pl.String,
    "answer": pl.String,
    "logprob": pl.Float64,
    "n_tokens": pl.Int64,
    "params": pl.String,
}
