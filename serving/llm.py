"""Offline batch inference, vLLM-style: `LLM(path).generate(prompts, SamplingParams(...))` and `.chat(...)`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from gemma4_jax.model import AssistantModel, Model, from_pretrained
from gemma4_jax.serving import compilation_cache as compilation_cache_lib
from gemma4_jax.serving.engine import Engine, EngineConfig, RequestOutput
from gemma4_jax.serving.media_decode import has_media_parts
from gemma4_jax.serving.sampling import SamplingParams
from gemma4_jax.serving.speculative import SpeculativeConfig
from gemma4_jax.serving.tokenizer import Tokenizer

_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


class LLM:
    """A model, its tokenizer and a continuous-batching engine.

    path: a checkpoint directory, or an already loaded `Model` (then pass `tokenizer` too for text prompts).
    dtype: "auto" (default: bfloat16 on accelerators and on CPUs that multiply it natively, float32 on other
    CPUs; model.resolve_dtype), "bfloat16",
    "float32" or "float16".
    Engine options (max_num_seqs, max_model_len, page_size, num_pages, kv_memory_gb, max_num_batched_tokens,
    attention_backend, prefill_backend, decode_backend) are keyword arguments. moe_backend ("auto", "xla",
    "fp4_pallas") picks the MoE expert matmul of a loaded checkpoint (gemma4_jax.from_pretrained).
    pp / tp / dp: pipeline stages, tensor(-expert) and data parallel degrees; `pipeline_microbatches` (engine
    option, default pp) is how many decode micro-batches flow through the stages at once (docs/sharding.md).
    compilation_cache: JAX's persistent compilation cache directory, False to leave it off, None (default) for
    $GEMMA4_JAX_COMPILATION_CACHE or ~/.cache/gemma4-jax/jax-compilation (serving/compilation_cache.py).
    warmup: compile every step shape of the engine's configuration now (serving/warmup.py; `LLM.warmup()` does it
    later), so that no generate call waits on a compile. Off by default here: an offline batch meets few of the
    shapes and compiles each once as it does, while warming every bucket of the default limits takes minutes on a
    CPU. `gemma4-jax serve` warms up before it reports ready (unless --enforce-eager).
    Speculative decoding: `speculative_config` (engine option; vLLM's dict, e.g. {"method": "ngram",
    "num_speculative_tokens": 3, "prompt_lookup_max": 4}), or `draft_model` (the MTP assistant: its checkpoint
    directory or a loaded AssistantModel on the target's mesh) with `num_speculative_tokens`
    (serving/speculative.py, docs/speculative.md).
    """

    def __init__(self, path: str | os.PathLike | Model, dtype: Any = "auto", pp: int = 1, tp: int = 1,
                 draft_model: str | os.PathLike | AssistantModel | None = None, num_speculative_tokens: int = 0,
                 tokenizer: Tokenizer | None = None,
                 moe_backend: str = "auto", dp: int = 1, compilation_cache: str | bool | None = None,
                 warmup: bool = False, **engine_options: Any):
        unknown = sorted(set(engine_options) - _ENGINE_FIELDS)
        if unknown:
            raise TypeError(f"unknown LLM option(s) {unknown}; engine options are {sorted(_ENGINE_FIELDS)}")
        if draft_model is not None or num_speculative_tokens:
            # One config from both forms; contradictions raise here, before anything loads.
            engine_options["speculative_config"] = SpeculativeConfig.resolve(
                engine_options.get("speculative_config"),
                os.fspath(draft_model) if isinstance(draft_model, (str, os.PathLike)) else draft_model,
                num_speculative_tokens)
        # Before anything compiles: a second start loads the executables instead (compilation_cache.py).
        self.compilation_cache_dir = compilation_cache_lib.enable(compilation_cache)
        if isinstance(path, Model):
            self.model = path
        else:
            self.model = from_pretrained(path, dtype=dtype, pp=pp, tp=tp, dp=dp, moe_backend=moe_backend)
            if tokenizer is None and os.path.exists(os.path.join(os.fspath(path), "tokenizer.json")):
                tokenizer = Tokenizer.from_dir(os.fspath(path))
        self.tokenizer = tokenizer
        self.engine = Engine(self.model, tokenizer, EngineConfig(**engine_options))
        if warmup:
            self.warmup()

    def warmup(self, progress: bool = True, max_audio_seconds: float = 30.0):
        """Compile (or load from the persistent compilation cache) every step shape the engine can run, and a
        multimodal model's towers (audio clips up to max_audio_seconds), with a progress bar and the time per shape
        at INFO. Returns a `warmup.WarmupReport` (shapes, new compiles, s)."""
        from gemma4_jax.serving.warmup import warm_up

        return warm_up(self.engine, progress=progress, max_audio_seconds=max_audio_seconds)

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (text, or token ids). With `n` > 1 a prompt yields n outputs, in order.

        A prompt with media is a dict (vLLM's form): {"prompt": text with one `<|image|>` / `<|audio|>` /
        `<|video|>` per item, or token ids, "multi_modal_data": {"image": [...], "audio": [...], "video": [...]}}.
        Images: paths, encoded bytes, PIL images or uint8 arrays; audio: WAV paths or bytes, float arrays at 16 kHz
        or (array, rate); video: frames (a list of images or an (F, H, W, 3) array). Bad media raise MediaError.
        """
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        # Media are decoded and checked before any request is queued (copies of a prompt share its soft tokens).
        inputs = [self._media_prompt(prompt) if isinstance(prompt, dict) else (prompt, None) for prompt in prompts]
        ids = []
        try:
            for (prompt, media), p in zip(inputs, params, strict=True):
                for i in range(p.n):
                    # Copies of one prompt need different seeds, or they would sample the same tokens.
                    copy = dataclasses.replace(p, n=1, seed=None if p.seed is None else p.seed + i)
                    ids.append(self.engine.add_request(prompt, copy, media=media))
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, **template_kwargs: Any) -> list[RequestOutput]:
        """Apply the checkpoint's chat template to each conversation, then generate.

        Content parts may carry media (OpenAI / HF style): {"type": "image", "image": path|bytes|PIL|array},
        {"type": "image_url", "image_url": {"url": "data:..."}}, {"type": "audio", "audio": WAV path|bytes|16 kHz
        array}, {"type": "input_audio", "input_audio": {"data": base64 WAV, "format": "wav"}}, {"type": "video",
        "video": frames}. The template renders each as its placeholder token, which is then expanded.
        """
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template (tokenizer.json in the checkpoint)")
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        prompts = []
        for conv in messages:
            if has_media_parts(list(conv)):
                ids, media = self.media_processor.process_chat(list(conv), add_generation_prompt=add_generation_prompt,
                                                               **template_kwargs)
                prompts.append({"prompt_token_ids": ids, "media": media})
            else:
                prompts.append(self.tokenizer.encode_chat(list(conv), add_generation_prompt=add_generation_prompt,
                                                          **template_kwargs))
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    @property
    def media_processor(self):
        """The request-side processor for images / video / audio (serving.mm_inputs.MediaProcessor)."""
        if getattr(self, "_media_processor", None) is None:
            from gemma4_jax.serving.mm_inputs import MediaProcessor

            self._media_processor = MediaProcessor(self.model, self.tokenizer, self.model.path)
        return self._media_processor

    def _media_prompt(self, prompt: dict):
        """A dict prompt -> (prompt ids, MediaInputs or None)."""
        if "prompt_token_ids" in prompt and "media" in prompt:  # already processed (chat)
            return prompt["prompt_token_ids"], prompt["media"]
        unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"})
        if unknown:
            raise ValueError(f"prompt dict: unknown key(s) {unknown}; use 'prompt' (or 'prompt_token_ids') and "
                             "'multi_modal_data'")
        text = prompt.get("prompt", prompt.get("prompt_token_ids"))
        if text is None:
            raise ValueError("prompt dict needs a 'prompt' (text or token ids)")
        data = prompt.get("multi_modal_data")
        if not data:
            return text, None
        return self.media_processor.process(text, data)

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
