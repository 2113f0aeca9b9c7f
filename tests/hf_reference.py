"""Tiny random Hugging Face Gemma 4 checkpoints for parity tests (torch + transformers, float32).

Every parameter and buffer is randomised (norm weights, layer scalars, PLE tables, router scales too), so a
parameter that we load into the wrong place or ignore changes the logits far beyond the tolerance.
"""

from __future__ import annotations

import json
import os

import numpy as np

BASE_TEXT = dict(
    vocab_size=384,
    vocab_size_per_layer_input=384,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    sliding_window=64,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    hidden_size_per_layer_input=0,
    num_kv_shared_layers=0,
    final_logit_softcapping=None,
    tie_word_embeddings=True,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
)


def text_config(**overrides):
    cfg = dict(BASE_TEXT)
    cfg.update(overrides)
    return cfg


def randomize_(model, seed: int = 0) -> None:
    """Overwrite every parameter and persistent buffer with random values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name or name.endswith("embed_scale"):
                continue  # derived constants, not weights
            if p.dtype not in (torch.float32, torch.float64):
                continue
            if p.ndim <= 1:
                # norms, layer scalars, router scales: positive, around 1, but clearly not 1
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in**0.5))


def randomize_towers_(model, seed: int, clip_low: float, clip_spread: float) -> None:
    """randomize_ for a model with media towers: the clipped linears' bounds become finite, +-(clip_low +
    clip_spread * U[0, 1)) drawn in buffer order from a generator seeded seed + 1, so that some activations are
    clipped; the audio tower's derived buffers (relative position timescales, attention soft-cap: config values,
    not weights) keep their values."""
    import torch

    derived = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("inv_timescales", "softcap"))}
    randomize_(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            leaf = name.rsplit(".", 1)[-1]
            if name in derived:
                buf.copy_(derived[name])
            elif leaf in ("input_min", "output_min"):
                buf.fill_(-(clip_low + clip_spread * torch.rand((), generator=g).item()))
            elif leaf in ("input_max", "output_max"):
                buf.fill_(clip_low + clip_spread * torch.rand((), generator=g).item())


def make_text_checkpoint(path: str, seed: int = 0, multimodal_wrapper: bool = False, **overrides):
    """Save a random Gemma4ForCausalLM (or a text-only Gemma4ForConditionalGeneration) to `path`."""
    import torch
    from transformers import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Gemma4TextConfig

    torch.manual_seed(seed)
    tc = Gemma4TextConfig(**text_config(**overrides))
    if multimodal_wrapper:
        cfg = Gemma4Config(text_config=tc.to_dict(), vision_config=None, audio_config=None,
                           tie_word_embeddings=tc.tie_word_embeddings)
        model = Gemma4ForConditionalGeneration(cfg)
    else:
        model = Gemma4ForCausalLM(tc)
    model = model.float().eval()
    model.config._attn_implementation = "eager"
    randomize_(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    return model


def hf_logits(model, input_ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long), use_cache=False)
    return out.logits.float().numpy()


def hf_greedy(model, prompt, n: int, ban_eos: bool = True, **options) -> list[int]:
    """HF `generate`'s greedy continuation of one prompt: n new token ids. With ban_eos, EOS is never picked
    (min_new_tokens=n); `options` are further generate arguments (e.g. eos_token_id=None: EOS may be picked but
    does not stop)."""
    import torch

    if ban_eos:
        options["min_new_tokens"] = n
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, **options)
    return out[0, len(prompt):].tolist()


def rewrite_json(file, fn) -> None:
    """Edit a JSON file: fn(dict) edits the dict in place (what it returns is ignored, so `d.pop` can be fn)."""
    with open(file) as f:
        d = json.load(f)
    fn(d)
    with open(file, "w") as f:
        json.dump(d, f, indent=2)


def rewrite_config(path, fn) -> None:
    rewrite_json(os.path.join(path, "config.json"), fn)


def edit_safetensors(path, edit) -> None:
    """Rewrite every *.safetensors file of a checkpoint directory: edit(dict of torch tensors) -> dict."""
    from safetensors.torch import load_file, save_file

    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            file = os.path.join(path, name)
            save_file(edit(load_file(file)), file, metadata={"format": "pt"})


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


BASE_AUDIO = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    hidden_act="silu",
    subsampling_conv_channels=[16, 8],  # 16 mel bins: ceil(16 / 4) == 16 // 4, as HF's projection size assumes
    conv_kernel_size=5,
    residual_weight=0.7,  # not HF's 0.5, so a hard-coded weight shows
    attention_chunk_size=4,
    attention_context_left=5,
    attention_context_right=2,
    attention_logit_cap=3.0,  # small enough that the tanh cap changes the logits
    use_clipped_linears=True,
    rms_norm_eps=1e-2,  # not 1e-6, so a norm built with the wrong eps shows
    gradient_clipping=2.0,  # bites on the residual stream and after the light convolution
    output_proj_dims=48,
)
N_MELS = BASE_AUDIO["subsampling_conv_channels"][0]  # 16 mel bins fit the tiny tower's projection
# Multimodal token ids inside the tiny text vocab (BASE_TEXT vocab_size=384).
TINY_MM_TOKENS = dict(image_token_id=370, video_token_id=371, audio_token_id=372, boi_token_id=373,
                      eoi_token_id=374, boa_token_id=375, eoa_token_index=376)


def make_audio_checkpoint(path: str, seed: int = 0, audio_overrides: dict | None = None, **text_overrides):
    """Save a random Gemma4ForConditionalGeneration with an audio tower (no vision) to `path`.

    Every parameter is randomised as in randomize_towers_; the clipped linears' bounds are about +-1..3.
    """
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig

    torch.manual_seed(seed)
    tc = Gemma4TextConfig(**text_config(**text_overrides))
    audio = {**BASE_AUDIO, **(audio_overrides or {})}
    cfg = Gemma4Config(text_config=tc.to_dict(), vision_config=None, audio_config=audio,
                       tie_word_embeddings=tc.tie_word_embeddings, **TINY_MM_TOKENS)
    model = Gemma4ForConditionalGeneration(cfg).float().eval()
    model.config._attn_implementation = "eager"
    randomize_towers_(model, seed, clip_low=1.0, clip_spread=2.0)
    model.save_pretrained(path, safe_serialization=True)
    return model


def hf_audio_embed(model, input_features: np.ndarray, input_features_mask: np.ndarray):
    """HF audio tower + embedder: (soft tokens (B, T', D_text), valid (B, T') bool) as numpy."""
    import torch

    with torch.no_grad():
        out = model.model.get_audio_features(torch.as_tensor(np.asarray(input_features, np.float32)),
                                             torch.as_tensor(np.asarray(input_features_mask, bool)), return_dict=True)
    return out.pooler_output.float().numpy(), out.attention_mask.numpy()


# Multimodal: a tiny vision tower (patch 4, pooling 3: an image of 12x12 pixels per soft token) and placeholder ids
# inside the tiny vocabulary, so that the text part is the same small model as above.
BASE_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    patch_size=4,
    pooling_kernel_size=3,
    position_embedding_size=256,  # a thin strip image is up to 162 patches wide
    use_clipped_linears=True,
    standardize=True,
    rope_parameters={"rope_type": "axial", "rope_theta": 100.0},
)
# ImageProcessor / VideoProcessor arguments for the tiny vision tower (70 soft tokens at most per image or frame).
TINY_PATCH = dict(patch_size=BASE_VISION["patch_size"], max_soft_tokens=70,
                  pooling_kernel_size=BASE_VISION["pooling_kernel_size"])


def make_multimodal_checkpoint(path: str, seed: int = 0, vision_overrides: dict | None = None,
                               audio_config: dict | None = None, **text_overrides):
    """Save a random Gemma4ForConditionalGeneration with a vision tower (and optionally an audio tower, e.g.
    `audio_config=BASE_AUDIO`) to `path`; placeholder ids are TINY_MM_TOKENS.

    Every parameter and buffer is randomised as in `randomize_towers_`; the clipped-linear bounds are about +-2
    (instead of +-inf or a narrow band around 1).
    """
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Gemma4Config(text_config=text_config(**text_overrides), vision_config={**BASE_VISION,
                       **(vision_overrides or {})}, audio_config=audio_config, **TINY_MM_TOKENS)
    model = Gemma4ForConditionalGeneration(cfg).float().eval()
    model.config._attn_implementation = "eager"
    for sub in (model.config.text_config, model.config.vision_config, model.config.audio_config):
        if sub is not None:
            sub._attn_implementation = "eager"
    randomize_towers_(model, seed, clip_low=1.5, clip_spread=1.0)
    model.save_pretrained(path, safe_serialization=True)
    return model


def hf_multimodal_logits(model, input_ids: np.ndarray, **inputs) -> np.ndarray:
    """Logits of a Gemma4ForConditionalGeneration; `inputs` are numpy arrays under the processor's names."""
    import torch

    tensors = {}
    for name, value in inputs.items():
        if value is None:
            continue
        arr = np.asarray(value)
        if arr.dtype == bool:  # masks stay boolean: HF indexes with them
            tensors[name] = torch.as_tensor(arr)
        else:
            tensors[name] = torch.as_tensor(arr, dtype=torch.float32 if arr.dtype.kind == "f" else torch.long)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long), use_cache=False, **tensors)
    return out.logits.float().numpy()


# ----------------------------------------------------------------------------------------------------------------
# MTP assistants (Gemma4AssistantForCausalLM)

# A drafter for a BASE_TEXT target (hidden 64, 2 KV heads of 16 / 32): every layer reads the target's K/V, so the
# head dims and KV heads are the target's; a window of 6 keys, shorter than the test contexts, so the assistant's
# sliding mask matters.
BASE_ASSISTANT_TEXT = dict(
    vocab_size=BASE_TEXT["vocab_size"],
    vocab_size_per_layer_input=0,
    hidden_size_per_layer_input=0,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    sliding_window=6,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    num_kv_shared_layers=3,
    final_logit_softcapping=None,
    max_position_embeddings=1024,
    rope_parameters=BASE_TEXT["rope_parameters"],
)
# Ordered embeddings: 8 clusters of 48 tokens (vocab 384), the top 3 scored.
ORDERED = dict(use_ordered_embeddings=True, num_centroids=8, centroid_intermediate_top_k=3)


def assistant_kv_sharing_patch():
    """A context manager under which transformers 5.23 can build an assistant: its `Gemma4TextConfig.kv_sharing_modes`
    raises when every layer is KV-shared (no layer produces a cache), which is exactly the assistant's case (its
    layers read the target's K/V); inside, such a config answers "reuse" for every layer."""
    import contextlib

    from transformers import Gemma4TextConfig

    original = Gemma4TextConfig.kv_sharing_modes

    def modes(self):
        if self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return original.fget(self)

    @contextlib.contextmanager
    def patched():
        Gemma4TextConfig.kv_sharing_modes = property(modes)
        try:
            yield
        finally:
            Gemma4TextConfig.kv_sharing_modes = original

    return patched()


def make_assistant_checkpoint(path: str, seed: int = 0, backbone_hidden_size: int = BASE_TEXT["hidden_size"],
                              use_ordered_embeddings: bool = False, num_centroids: int = 8,
                              centroid_intermediate_top_k: int = 3, tie_word_embeddings: bool = True,
                              **text_overrides):
    """Save a random Gemma4AssistantForCausalLM to `path` (float32, eager attention) and return it.

    Every parameter is randomised (randomize_); with ordered embeddings, token_ordering is a random permutation of
    the vocabulary (HF initialises it to zeros)."""
    import torch
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM

    torch.manual_seed(seed)
    with assistant_kv_sharing_patch():
        cfg = Gemma4AssistantConfig(text_config={"model_type": "gemma4_text", **BASE_ASSISTANT_TEXT, **text_overrides},
                                    backbone_hidden_size=backbone_hidden_size,
                                    use_ordered_embeddings=use_ordered_embeddings, num_centroids=num_centroids,
                                    centroid_intermediate_top_k=centroid_intermediate_top_k,
                                    tie_word_embeddings=tie_word_embeddings)
        model = Gemma4AssistantForCausalLM(cfg).float().eval()
        model.config._attn_implementation = "eager"
        model.config.get_text_config()._attn_implementation = "eager"
        randomize_(model, seed)
        if use_ordered_embeddings:
            g = torch.Generator().manual_seed(seed + 1)
            vocab = cfg.get_text_config().vocab_size
            model.masked_embedding.token_ordering.copy_(torch.randperm(vocab, generator=g))
        model.save_pretrained(path, safe_serialization=True)
    return model


def hf_assistant_step(model, token_embedding, hidden, shared_kv, position, attention_mask=None):
    """HF's assistant forward for one draft step, batch 1 (HF's assisted generation runs batch 1; its centroid head
    takes the masked value over the whole batch).

    token_embedding, hidden: (D_t,); shared_kv: {"sliding_attention" | "full_attention": (k, v)} as numpy
    (1, K, S, H) in HF's layout; position: int. Inputs are cast to the model's dtype. Returns (logits (V,), next
    hidden (D_t,)) as float32 numpy."""
    import torch

    dtype = next(model.parameters()).dtype  # inputs in the model's dtype (a bfloat16 copy takes bfloat16)
    t = lambda a: torch.as_tensor(np.asarray(a, np.float32)).to(dtype)  # noqa: E731
    inputs = torch.cat([t(token_embedding), t(hidden)])[None, None]
    kv = {kind: (t(k), t(v)) for kind, (k, v) in shared_kv.items()}
    mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    with torch.no_grad(), assistant_kv_sharing_patch():
        out = model(inputs_embeds=inputs, position_ids=torch.tensor([[position]]), shared_kv_states=kv,
                    attention_mask=mask, use_cache=False)
    return out.logits[0, 0].float().numpy(), out.last_hidden_state[0, 0].float().numpy()
