"""Decoding for the unified model: batched prefill-then-decode over text and image tokens, with a
KV cache and classifier-free guidance, and the samplers it draws tokens with.

``UnifiedVLM.generate`` is this module's :func:`generate` on the model; the record-level tasks
(answer a VQA record, write a caption, draw a prompt) are in ``unified_vlm.evaluation.record_tasks``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import DynamicCache, StaticCache

log = logging.getLogger(__name__)


def warn_unguidable(model, cfg_scale: float) -> None:
    """Warn (once per model) that guidance has nothing to work with: a model trained with
    ``image_output.prompt_dropout`` 0 never saw the unconditional prompt, so its unconditional
    prediction is arbitrary and ``u + s * (c - u)`` does not push towards the prompt."""
    if getattr(model, "prompt_dropout", None) == 0 and not getattr(model, "_warned_unguidable", False):
        log.warning("cfg_scale %g with a model trained with image_output.prompt_dropout 0: it never saw the "
                    "unconditional prompt, so guidance has nothing to work with (train with prompt_dropout 0.1)", cfg_scale)
        model._warned_unguidable = True

TEXT, IMAGE, DONE = 0, 1, 2


class PreallocatedCache(StaticCache):
    """transformers' StaticCache that stores keys and values in one dtype, that of the first keys.
    Under autocast the keys come out of the rotary embedding in fp32 (its tables follow the fp32
    input embeddings) while the values stay bf16; the growing cache keeps each as it comes, the
    preallocated one holds both in the keys' dtype and must cast before writing in place."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        dtype = layer.dtype if layer.is_initialized else key_states.dtype
        return super().update(key_states.to(dtype), value_states.to(dtype), layer_idx, *args, **kwargs)


@dataclass
class Generated:
    """One sample's generation: text token ids (image tokens excluded) and image targets."""

    text_ids: list[int]
    image_tokens: Optional[torch.Tensor]  # (N,) codes or (N, D) features; None if no image


def filter_logits(logits: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """Top-k then nucleus filtering on (B, V) logits; filtered entries become -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        remove = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_logits(
    logits: torch.Tensor,
    temperature: float,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Greedy when temperature <= 0, else temperature / top-k / top-p sampling. (B, V) -> (B,)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def decode_step(model, embeds, attention_mask, position_ids, cache) -> torch.Tensor:
    """Run the decoder on new input embeddings (with the cache, or on the whole sequence without);
    the last position's hidden state, (R, H)."""
    out = model.decoder(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=cache is not None,
    )
    return out.last_hidden_state[:, -1]


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    und_images: Optional[list[Optional[torch.Tensor]]] = None,
    max_new_tokens: Optional[int] = None,
    image_policy: str = "auto",
    temperature: Optional[float] = None,
    image_temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    use_cache: bool = True,
    cfg_scale: Optional[float] = None,
    uncond_prompts: Optional[list[list[int]]] = None,
    cache: str = "static",
) -> list[Generated]:
    """Batched prefill-then-decode over text and image tokens with ``model`` (a UnifiedVLM).

    Text tokens are sampled from the LM head. After IMAGE_START the sample switches to image
    mode: the output head predicts ``num_tokens`` image tokens, each fed back through the
    generation projector, then IMAGE_END is appended and the sample stops. ``image_policy``:
    ``auto`` (the model decides), ``force`` (an image is always produced: ending the turn
    before one opens it instead) or ``never`` (IMAGE_START is masked). With ``use_cache=False``
    every step recomputes the whole sequence (the paper's loop); both give the same tokens.
    ``cache``: ``static`` (default) preallocates the keys and values of the longest possible sequence
    and writes each step in place; ``dynamic`` grows them by concatenation, which copies the whole
    cache at every step (measured: most of a cached step's time at batch 64, docs/machines.md).

    Classifier-free guidance (``cfg_scale`` != 1, needs ``uncond_prompts``): each prompt runs
    beside its unconditional twin, which copies the text tokens the conditional row samples;
    image predictions are mixed as ``u + cfg_scale * (c - u)`` (logits, or features for
    continuous heads) and the mixed token is fed to both rows.

    Settings left None come from ``model.sampling_spec``.
    """
    if image_policy not in ("auto", "force", "never"):
        raise ValueError(f"image_policy must be auto, force or never, got {image_policy!r}")
    if cache not in ("static", "dynamic"):
        raise ValueError(f"cache must be static or dynamic, got {cache!r}")
    s = model.sampling_spec
    max_new_tokens = s.max_new_tokens if max_new_tokens is None else max_new_tokens
    temperature = s.temperature if temperature is None else temperature
    image_temperature = s.image_temperature if image_temperature is None else image_temperature
    top_k = s.top_k if top_k is None else top_k
    top_p = s.top_p if top_p is None else top_p
    cfg_scale = s.cfg_scale if cfg_scale is None else cfg_scale
    guided = cfg_scale != 1.0
    if guided:
        warn_unguidable(model, cfg_scale)
        if uncond_prompts is None or len(uncond_prompts) != len(prompts):
            raise ValueError("cfg_scale != 1 needs one unconditional prompt per prompt (uncond_prompts)")
        if und_images is not None and any(im is not None for im in und_images):
            raise ValueError("classifier-free guidance is for text-to-image prompts; these prompts carry images")
    device = model.device
    generator = torch.Generator(device=device).manual_seed(s.seed if seed is None else seed)
    B = len(prompts)
    ids = model.ids
    und_images = und_images or [None] * B

    # Left-pad the prompts so every sample's next token sits in the last column; with guidance
    # rows B..2B-1 are the unconditional twins of rows 0..B-1.
    rows = list(prompts) + (list(uncond_prompts) if guided else [])
    R = len(rows)
    length = max(len(p) for p in rows)
    input_ids = torch.full((R, length), ids["pad"], dtype=torch.long)
    attention = torch.zeros((R, length), dtype=torch.long)
    for i, p in enumerate(rows):
        input_ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long)
        attention[i, length - len(p):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    images = [im for im in und_images if im is not None]
    und = torch.stack(images).to(device) if images else None
    embeds = model.embed_inputs(input_ids, und)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)

    n_img = model.output_space.num_tokens
    kv_cache = None
    if use_cache and cache == "dynamic":
        kv_cache = DynamicCache(config=model.lm.config)
    elif use_cache:  # room for every step the loop can take: text, IMAGE_START, the image, IMAGE_END
        kv_cache = PreallocatedCache(config=model.lm.config, max_cache_len=length + max_new_tokens + n_img + 2)
    hidden = decode_step(model, embeds, attention, positions, kv_cache)
    all_embeds = embeds

    mode = [TEXT] * B
    text_out: list[list[int]] = [[] for _ in range(B)]
    image_out: list[list[torch.Tensor]] = [[] for _ in range(B)]
    embed_tokens = model.lm.get_input_embeddings()
    stop_ids = {ids["end_turn"], ids["eos"]}
    while any(m != DONE for m in mode):
        next_embeds = embed_tokens(torch.full((R,), ids["pad"], device=device, dtype=torch.long)).clone()
        next_mask = torch.zeros(R, dtype=torch.long, device=device)
        text_rows = [i for i in range(B) if mode[i] == TEXT]
        image_rows = [i for i in range(B) if mode[i] == IMAGE]
        if text_rows:
            logits = model.lm.lm_head(hidden[text_rows]).float()
            if image_policy == "never":
                logits[:, ids["image_start"]] = float("-inf")
            if image_policy == "force":
                for sid in stop_ids:
                    logits[:, sid] = float("-inf")
            tokens = sample_logits(logits, temperature, top_k, top_p, generator).tolist()
            for k, row in enumerate(text_rows):
                if image_policy == "force" and len(text_out[row]) + 1 >= max_new_tokens:
                    tokens[k] = ids["image_start"]
                token = tokens[k]
                text_out[row].append(token)
                if token == ids["image_start"] and image_policy != "never":
                    mode[row] = IMAGE
                elif token in stop_ids or len(text_out[row]) >= max_new_tokens:
                    mode[row] = DONE
            # one embedding lookup and one scatter for all text rows (not one small op per row)
            text_index = torch.tensor(text_rows, device=device)
            next_embeds[text_index] = embed_tokens(torch.tensor(tokens, device=device)).to(next_embeds.dtype)
            next_mask[text_index] = 1
        if image_rows:
            rows_done = [i for i in image_rows if len(image_out[i]) == n_img]
            active = [i for i in image_rows if len(image_out[i]) < n_img]
            if rows_done:  # image complete: close it and stop
                for row in rows_done:
                    text_out[row].append(ids["image_end"])
                    mode[row] = DONE
                done_index = torch.tensor(rows_done, device=device)
                next_embeds[done_index] = embed_tokens(torch.tensor(ids["image_end"], device=device)).to(next_embeds.dtype)
                next_mask[done_index] = 1
            if active:
                pred = model.head(hidden[active])
                if guided:
                    uncond = model.head(hidden[[i + B for i in active]])
                    pred = uncond.float() + cfg_scale * (pred.float() - uncond.float())
                if model.output_space.discrete:
                    token = sample_logits(pred, image_temperature, top_k, top_p, generator)
                else:
                    token = pred.float()
                slots = torch.tensor([len(image_out[row]) for row in active], device=device)
                feats = model.embed_generation_targets(token.unsqueeze(1), slots).squeeze(1)
                drawn = token.detach().cpu()  # one device-to-host copy per step, not one per row
                for j, row in enumerate(active):
                    image_out[row].append(drawn[j])
                active_index = torch.tensor(active, device=device)
                next_embeds[active_index] = feats.to(next_embeds.dtype)
                next_mask[active_index] = 1
        if all(m == DONE for m in mode):
            break  # the final tokens are recorded; no need to run the LM on them
        if guided:  # the unconditional twins take the same tokens
            next_embeds[B:], next_mask[B:] = next_embeds[:B], next_mask[:B]
        attention = torch.cat([attention, next_mask[:, None]], dim=1)
        new_pos = positions[:, -1:] + 1
        positions = torch.cat([positions, new_pos], dim=1)
        step_embeds = next_embeds[:, None].to(all_embeds.dtype)
        if use_cache:
            hidden = decode_step(model, step_embeds, attention, new_pos, kv_cache)
        else:
            all_embeds = torch.cat([all_embeds, step_embeds], dim=1)
            hidden = decode_step(model, all_embeds, attention, positions, None)
    return [
        Generated(text_ids=text_out[i], image_tokens=torch.stack(image_out[i]) if image_out[i] else None)
        for i in range(B)
    ]
