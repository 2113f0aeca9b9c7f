"""Offline batch inference, vLLM-style: `LLM(path).generate(prompts, SamplingParams(...))` and `.chat(...)`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from gemma4_jax.model import Model, from_pretrained
from gemma4_jax.serving.engine import Engine, EngineConfig, RequestOutput
from gemma4_jax.serving.sampling import SamplingParams
from gemma4_jax.serving.tokenizer import Tokenizer

_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


class LLM:
    """A model, its tokenizer and a continuous-batching engine.

    path: a checkpoint directory, or an already loaded `Model` (then pass `tokenizer` too for text prompts).
    Engine options (max_num_seqs, max_model_len, page_size, num_pages, kv_memory_gb, max_num_batched_tokens,
    attention_backend, prefill_backend, decode_backend) are keyword arguments.
    """

    def __init__(self, path: str | os.PathLike | Model, dtype: Any = "bfloat16", pp: int = 1, tp: int = 1,
                 draft_model: str | None = None, num_speculative_tokens: int = 0, tokenizer: Tokenizer | None = None,
                 **engine_options: Any):
        unknown = sorted(set(engine_options) - _ENGINE_FIELDS)
        if unknown:
            raise TypeError(f"unknown LLM option(s) {unknown}; engine options are {sorted(_ENGINE_FIELDS)}")
        if draft_model is not None or num_speculative_tokens:
            raise ValueError("speculative decoding (draft_model / num_speculative_tokens) is not available in this "
                             "version of gemma4-jax yet; leave them unset")
        if isinstance(path, Model):
            self.model = path
        else:
            self.model = from_pretrained(path, dtype=dtype, pp=pp, tp=tp)
            if tokenizer is None and os.path.exists(os.path.join(os.fspath(path), "tokenizer.json")):
                tokenizer = Tokenizer.from_dir(os.fspath(path))
        self.tokenizer = tokenizer
        self.engine = Engine(self.model, tokenizer, EngineConfig(**engine_options))

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (text, or token ids). With `n` > 1 a prompt yields n outputs, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                for i in range(p.n):
                    # Copies of one prompt need different seeds, or they would sample the same tokens.
                    copy = dataclasses.replace(p, n=1, seed=None if p.seed is None else p.seed + i)
                    ids.append(self.engine.add_request(prompt, copy))
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, **template_kwargs: Any) -> list[RequestOutput]:
        """Apply the checkpoint's chat template to each conversation, then generate."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template (tokenizer.json in the checkpoint)")
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        prompts = [self.tokenizer.encode_chat(list(conv), add_generation_prompt=add_generation_prompt,
                                              **template_kwargs) for conv in messages]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        bar = None
        if use_tqdm and len(ids) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req")
        done: dict[str, RequestOutput] = {}
        wanted = set(ids)
        while len(done) < len(ids):
            if not self.engine.has_unfinished():
                raise RuntimeError("engine stopped with unfinished requests")
            for out in self.engine.step():
                if out.finished and out.request_id in wanted and out.request_id not in done:
                    done[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        for rid in ids:
            self.engine.requests.pop(rid, None)
        return [done[rid] for rid in ids]
