"""UnifiedVLM: one language backbone that answers questions about images and generates images.

Understanding: encoder tokens -> understanding projector -> spliced into the LM's input
embeddings at IMAGE_PAD slots. Generation: ground-truth image tokens (VQ codes) are
teacher-forced through the generation projector at GEN_PAD slots, and an output head reads the
hidden state *before* each slot to predict that slot's token. Loss = text CE + alpha * image
loss (PAPER.md 2.5 and 3.1).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from unified_vlm.models import staged
from unified_vlm.models.backbones import apply_training_policy
from unified_vlm.models.distortion import build_distortion
from unified_vlm.models.projectors import TokenSlotEmbedding
from unified_vlm.models.config import (
    BackboneSpec,
    DistortionSpec,
    EncoderSpec,
    ImageOutputSpec,
    OptimSpec,
    SamplingSpec,
    coerce,
    to_primitive,
)
from unified_vlm.registry import BACKBONES, HEADS, PROJECTORS
from unified_vlm.tokens import IGNORE_INDEX

log = logging.getLogger(__name__)

CAPTION_TOKENS = 96  # test captions are 35 tokens of the watch BPE on average, 56 at most

TEXT, IMAGE, DONE = 0, 1, 2


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


class FeatureWhitening(nn.Module):
    """PCA (ZCA) whitening of frozen encoder features, estimated from the first training features.

    Why: a frozen encoder's token can be dominated by a few high-variance directions (the tiny
    watch encoder's pooled token: face colour and hands hold most of its variance, the weather
    icon 1.3 % and the corner items 2.3 %). Whitening gives every direction unit variance, so a
    projector starts with all of them equally loud. On the tiny watch default it did not make the
    language model read the weather sooner (README, "What limits understanding"); it is kept as an
    option for encoders whose scales differ wildly.

    The statistics are a running average over the first ``fit_samples`` feature rows seen in
    training (summed over processes under DDP), then frozen; they are buffers, so checkpoints
    carry them and evaluation uses exactly the training transform.
    """

    def __init__(self, dim: int, fit_samples: int = 16384, eps: float = 1e-2) -> None:
        super().__init__()
        self.fit_samples, self.eps = fit_samples, eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("second_moment", torch.zeros(dim, dim, dtype=torch.float64))
        self.register_buffer("transform", torch.eye(dim))
        self.register_buffer("center", torch.zeros(dim))

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        stats = torch.cat([x.new_tensor([len(x)]), x.sum(0), (x.T @ x).flatten()])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        n, dim = stats[0], x.shape[1]
        total = self.count + n
        self.mean.mul_(self.count / total).add_(stats[1:1 + dim] / total)
        self.second_moment.mul_(self.count / total).add_(stats[1 + dim:].view(dim, dim) / total)
        self.count.copy_(total)
        cov = self.second_moment - torch.outer(self.mean, self.mean)
        eigval, eigvec = torch.linalg.eigh(cov)
        eigval = eigval.clamp(min=0) + self.eps * eigval.clamp(min=0).mean()
        self.transform.copy_((eigvec @ torch.diag(eigval.rsqrt()) @ eigvec.T).float())
        self.center.copy_(self.mean.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.count < self.fit_samples:
            self._update(x)
        return (x.float() - self.center) @ self.transform


def build_feature_norm(kind: Optional[str], dim: int) -> Optional[nn.Module]:
    """Condition encoder features before the projector.

    ``whiten``: :class:`FeatureWhitening` (decorrelate and scale every direction to unit
    variance). ``batch``: per-dimension standardisation with running statistics (BatchNorm
    without affine parameters). ``layer``: LayerNorm per token. None: raw features, as LLaVA and
    the paper feed them.
    """
    if kind is None:
        return None
    if kind == "whiten":
        return FeatureWhitening(dim)
    if kind == "batch":
        return nn.BatchNorm1d(dim, affine=False, momentum=0.01)
    if kind == "layer":
        return nn.LayerNorm(dim, elementwise_affine=False)
    raise ValueError(f"und_feature_norm must be whiten, batch, layer or null, got {kind!r}")


class UnifiedVLM(L.LightningModule):
    """A unified VLM composed from registered parts; see the module docstring for the data flow.

    Args:
        text_tokenizer: ``builtin`` (the shipped watch BPE) or a local tokenizer directory; the
            chat special tokens are added when missing.
        encoder: the understanding-side vision tower (EncoderSpec).
        backbone: the language backbone and its training policy (BackboneSpec).
        image_output: the generation side: output space, head, alpha, projector sharing (ImageOutputSpec).
        und_projector: registered projector for understanding features (``linear`` or ``mlp``).
        und_feature_norm: condition encoder features before the projector: ``whiten``, ``batch``,
            ``layer`` or null (raw, as the paper).
        optim: AdamW, warmup and cosine, per-group learning rates (OptimSpec).
        sampling: decoding settings for test and predict (SamplingSpec).
        max_length: longest tokenised record; longer ones are an error, never silently cut.
        text_loss_average: ``token`` (mean over supervised tokens, the paper's) or ``turn`` (every
            supervised assistant turn weighs the same; see ``text_loss``).
        und_token_embedding: add a learned vector per image-token slot after the projector
            (``TokenSlotEmbedding``), so the LM can tell which patch token it attends to.
        und_distortion: a fixed affine map of the understanding encoder's features (DistortionSpec:
            strength, seed, translation; PAPER.md 5.2 b); null = none. Generation is untouched.
        init_from: start ``fit`` from the model weights of this checkpoint (not its optimizer or
            step); loaded at fit start unless the fit resumes from its own checkpoint.
        freeze: modules that get no gradient and stay in eval mode: und_projector, gen_projector,
            und_token_embedding, und_feature_norm, head, lm (all of it) or lora (its adapters).
    """

    def __init__(
        self,
        text_tokenizer: str = "builtin",
        encoder: Optional[EncoderSpec] = None,
        backbone: Optional[BackboneSpec] = None,
        image_output: Optional[ImageOutputSpec] = None,
        und_projector: str = "mlp",
        und_feature_norm: Optional[str] = None,
        optim: Optional[OptimSpec] = None,
        sampling: Optional[SamplingSpec] = None,
        max_length: int = 512,
        text_loss_average: str = "token",
        und_token_embedding: bool = False,
        und_distortion: Optional[DistortionSpec] = None,
        init_from: Optional[str] = None,
        freeze: Optional[list[str]] = None,
    ) -> None:
        super().__init__()
        encoder, backbone = coerce(EncoderSpec, encoder), coerce(BackboneSpec, backbone)
        image_output, optim = coerce(ImageOutputSpec, image_output), coerce(OptimSpec, optim)
        sampling = coerce(SamplingSpec, sampling)
        self.save_hyperparameters(
            {
                "text_tokenizer": text_tokenizer,
                "encoder": to_primitive(encoder),
                "backbone": to_primitive(backbone),
                "image_output": to_primitive(image_output),
                "und_projector": und_projector,
                "und_feature_norm": und_feature_norm,
                "optim": to_primitive(optim),
                "sampling": to_primitive(sampling),
                "max_length": max_length,
                "text_loss_average": text_loss_average,
                "und_token_embedding": und_token_embedding,
                "und_distortion": None if und_distortion is None else to_primitive(coerce(DistortionSpec, und_distortion)),
                "init_from": init_from,
                "freeze": None if freeze is None else list(freeze),
            }
        )
        self.optim_spec, self.sampling_spec = optim, sampling
        if text_loss_average not in ("token", "turn"):
            raise ValueError(f"text_loss_average must be 'token' or 'turn', got {text_loss_average!r}")
        self.text_loss_average = text_loss_average
        from unified_vlm.models.builders import build_encoder, build_output_space, build_text_tokenizer
        from unified_vlm.datamodules.collate import ConversationCollator
        from unified_vlm.text_tokenizer import special_token_ids

        self.tokenizer = build_text_tokenizer(text_tokenizer)
        self.ids = special_token_ids(self.tokenizer)
        self.encoder = build_encoder(encoder)
        self.encoder_frozen = encoder.freeze
        if encoder.freeze:
            self.encoder.requires_grad_(False)
        self.output_space = build_output_space(image_output, encoder)
        self.lm = apply_training_policy(
            BACKBONES.create(backbone.name, vocab_size=len(self.tokenizer), **backbone.options),
            backbone.train,
            backbone.lora,
            backbone.gradient_checkpointing,
        )
        self.backbone_policy = backbone.train
        hidden = self.lm.config.hidden_size

        self.und_projector = PROJECTORS.create(und_projector, in_dim=self.encoder.feature_dim, out_dim=hidden)
        self.und_feature_norm = build_feature_norm(und_feature_norm, self.encoder.feature_dim)
        self.und_distortion = build_distortion(und_distortion, self.encoder.feature_dim)
        self.und_token_embedding = TokenSlotEmbedding(self.encoder.num_tokens, hidden) if und_token_embedding else None
        # Aligned pairs read and write one space: VQ codes in and out, or the same feature tower.
        aligned = (encoder.name == "vq_codes" and image_output.space == "vq") or (
            image_output.space == "features" and image_output.encoder in (None, to_primitive(encoder))
        )
        share = aligned if image_output.share_projector is None else image_output.share_projector
        if share:
            if self.encoder.feature_dim != self.output_space.feature_dim:
                raise ValueError(
                    f"image_output.share_projector=true needs equal feature sizes, but the encoder gives "
                    f"{self.encoder.feature_dim} and the output space {self.output_space.feature_dim}; "
                    "set share_projector: false"
                )
            self.gen_projector = self.und_projector
        else:
            self.gen_projector = PROJECTORS.create(
                image_output.projector, in_dim=self.output_space.feature_dim, out_dim=hidden
            )
        self.shares_projector = share
        self.gen_token_embedding = (
            TokenSlotEmbedding(self.output_space.num_tokens, hidden) if image_output.position_embedding == "learned" else None
        )
        log.info(
            "generation inputs %s the understanding projector (%s)",
            "share" if share else "do not share",
            "explicit" if image_output.share_projector is not None else ("aligned spaces" if aligned else "misaligned spaces"),
        )
        if getattr(HEADS.get(image_output.head), "discrete", True) != self.output_space.discrete:
            raise ValueError(
                f"head {image_output.head!r} does not fit output space {image_output.space!r}: "
                f"{'discrete' if self.output_space.discrete else 'continuous'} targets need "
                f"{'vq_classification' if self.output_space.discrete else 'feature_regression'}"
            )
        head_options = dict(image_output.head_options)
        if self.output_space.discrete:
            self.head = HEADS.create(image_output.head, hidden_size=hidden, codebook_size=self.output_space.target_size, **head_options)
        else:
            self.head = HEADS.create(image_output.head, hidden_size=hidden, feature_dim=self.output_space.feature_dim, **head_options)
        self.alpha = image_output.loss_weight
        self.collator = ConversationCollator(
            tokenizer=self.tokenizer,
            num_understanding_tokens=self.encoder.num_tokens,
            num_generation_tokens=self.output_space.num_tokens,
            max_length=max_length,
            prompt_dropout=image_output.prompt_dropout,
        )
        self.test_records: list[dict] = []  # filled by test_step, read by the report callbacks
        self.init_from = init_from
        self.frozen = staged.check_freeze_names(self, freeze)
        staged.freeze(self, self.frozen)
        self.train()  # Lightning does not call train() before fitting: put frozen parts in eval mode now

    # ------------------------------------------------------------------ modules
    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        self.output_space.eval()
        for module in staged.frozen_modules(self, self.frozen):
            module.eval()
        return self

    @property
    def decoder(self) -> nn.Module:
        return self.lm.get_decoder()

    def encode_understanding(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N,3,H,W) in [0,1] -> projected tokens (N, T, hidden)."""
        if self.encoder_frozen:
            with torch.no_grad():
                feats = self.encoder(images)
        else:
            feats = self.encoder(images)
        if self.und_distortion is not None:
            feats = self.und_distortion(feats)
        if self.und_feature_norm is not None:
            feats = self.und_feature_norm(feats.float().flatten(0, 1)).view_as(feats)
        tokens = self.und_projector(feats)
        return tokens if self.und_token_embedding is None else self.und_token_embedding(tokens)

    def embed_generation_targets(self, targets: torch.Tensor, slots: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Image targets (N, T[, D]) -> projected generation-side input tokens (N, T, hidden).

        ``slots`` (N,): the slot index of each row's single token (T = 1) while decoding; without
        it the T tokens are slots 0..T-1 (teacher forcing)."""
        tokens = self.gen_projector(self.output_space.input_features(targets))
        return tokens if self.gen_token_embedding is None else self.gen_token_embedding(tokens, slots)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        und_pixel_values: Optional[torch.Tensor] = None,
        gen_targets: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Token embeddings with image features spliced in at IMAGE_PAD / GEN_PAD slots."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        for slot, source, fn in (
            (self.ids["image_pad"], und_pixel_values, self.encode_understanding),
            (self.ids["gen_pad"], gen_targets, self.embed_generation_targets),
        ):
            mask = input_ids == slot
            n_slots = int(mask.sum())
            if n_slots == 0:
                continue
            if source is None or len(source) == 0:
                raise ValueError(f"batch has {n_slots} image slots (token id {slot}) but no images for them")
            feats = fn(source)
            if feats.shape[0] * feats.shape[1] != n_slots:
                raise ValueError(
                    f"batch has {n_slots} image slots (token id {slot}) but {feats.shape[0]} image(s) x "
                    f"{feats.shape[1]} tokens were given: the collator and the model disagree on tokens per image"
                )
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.dtype))
        return embeds

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        input_ids, labels = batch["input_ids"], batch["labels"]
        gen_pixels = batch.get("gen_pixel_values")
        gen_targets = self.output_space.targets(gen_pixels) if gen_pixels is not None and len(gen_pixels) else None
        embeds = self.embed_inputs(input_ids, batch.get("und_pixel_values"), gen_targets)
        hidden = self.decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state

        text_loss = self.text_loss(self.lm.lm_head(hidden[:, :-1]), labels[:, 1:])
        # The hidden state before each GEN_PAD slot predicts that slot's image token.
        slot_mask = input_ids[:, 1:] == self.ids["gen_pad"]
        if gen_targets is not None:
            prediction = self.head(hidden[:, :-1][slot_mask])
            target = gen_targets.reshape(prediction.shape[0], *gen_targets.shape[2:])
            image_loss = self.head.loss(prediction, target)
        else:  # keep every head parameter in the graph (DDP) with a zero contribution
            image_loss = sum(p.sum() for p in self.head.parameters()) * 0.0
        if batch.get("und_pixel_values") is None or not (input_ids == self.ids["image_pad"]).any():
            text_loss = text_loss + sum(p.sum() for p in self.und_projector.parameters()) * 0.0
        if gen_targets is None:
            idle = [] if self.shares_projector else list(self.gen_projector.parameters())
            idle += [] if self.gen_token_embedding is None else list(self.gen_token_embedding.parameters())
            image_loss = image_loss + sum(p.sum() for p in idle) * 0.0
        return {"loss": text_loss + self.alpha * image_loss, "text_loss": text_loss, "image_loss": image_loss}

    def text_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy, averaged as ``text_loss_average`` says.

        ``token``: the mean over every supervised token of the batch (HF style, the paper's).
        ``turn``: every supervised assistant turn (the tokens up to and including its END_TURN)
        weighs the same, whatever its length. A one-word VQA answer then counts as much as an
        8-token time or a 40-token caption, instead of being drowned by them.
        """
        ce = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(targets.shape)
        valid = targets != IGNORE_INDEX
        if self.text_loss_average == "token":
            return ce.sum() / valid.sum().clamp(min=1)
        ends = (targets == self.ids["end_turn"]) & valid
        turn = torch.cumsum(ends.long(), dim=1) - ends.long()  # END_TURN belongs to the turn it closes
        group = (turn + torch.arange(targets.shape[0], device=targets.device)[:, None] * targets.shape[1])[valid]
        sizes = torch.zeros(targets.numel(), device=targets.device).scatter_add_(0, group, torch.ones_like(group, dtype=torch.float))
        return (ce[valid] / sizes[group]).sum() / (sizes > 0).sum().clamp(min=1)

    def _shared_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        out = self(batch)
        bs = batch["input_ids"].shape[0]
        if stage == "train":  # read by NonFiniteLossGuard only when the loss is not finite
            self.last_loss_terms = {k: v.detach() for k, v in out.items()}
        self.log(f"{stage}/loss", out["loss"], prog_bar=True, batch_size=bs, sync_dist=stage != "train")
        self.log(f"{stage}/text_loss", out["text_loss"], prog_bar=stage == "train", batch_size=bs, sync_dist=stage != "train")
        self.log(f"{stage}/image_loss", out["image_loss"], prog_bar=stage == "train", batch_size=bs, sync_dist=stage != "train")
        return out["loss"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Projectors, output head and slot vectors: what trains at ``optim.projector_lr``."""
        modules = (self.und_projector, self.head, self.und_token_embedding, self.gen_token_embedding,
                   None if self.shares_projector else self.gen_projector)
        return [p for m in modules if m is not None for p in m.parameters()]

    def configure_optimizers(self):
        spec = self.optim_spec
        adapters = self.adapter_parameters()
        adapter_ids = {id(p) for p in adapters}
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad or id(p) in adapter_ids:
                continue
            (no_decay if p.ndim < 2 or "norm" in name or "embed" in name else decay).append(p)
        groups = [
            {"params": decay, "lr": spec.lr, "weight_decay": spec.weight_decay, "name": "backbone"},
            {"params": no_decay, "lr": spec.lr, "weight_decay": 0.0, "name": "backbone_no_decay"},
            {"params": [p for p in adapters if p.requires_grad], "lr": spec.projector_lr, "weight_decay": 0.0, "name": "projectors_heads"},
        ]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError(f"nothing to train: every parameter is frozen (model.freeze: {self.frozen})")
        optimizer = torch.optim.AdamW(groups, betas=tuple(spec.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(spec.warmup_ratio * total))

        def lr_lambda(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ generation
    def _decode_step(self, embeds, attention_mask, position_ids, cache):
        out = self.decoder(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state[:, -1]

    @torch.no_grad()
    def generate(
        self,
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
    ) -> list[Generated]:
        """Batched prefill-then-decode over text and image tokens.

        Text tokens are sampled from the LM head. After IMAGE_START the sample switches to image
        mode: the output head predicts ``num_tokens`` image tokens, each fed back through the
        generation projector, then IMAGE_END is appended and the sample stops. ``image_policy``:
        ``auto`` (the model decides), ``force`` (an image is always produced: ending the turn
        before one opens it instead) or ``never`` (IMAGE_START is masked). With ``use_cache=False``
        every step recomputes the whole sequence (the paper's loop); both give the same tokens.

        Classifier-free guidance (``cfg_scale`` != 1, needs ``uncond_prompts``): each prompt runs
        beside its unconditional twin, which copies the text tokens the conditional row samples;
        image predictions are mixed as ``u + cfg_scale * (c - u)`` (logits, or features for
        continuous heads) and the mixed token is fed to both rows.
        """
        if image_policy not in ("auto", "force", "never"):
            raise ValueError(f"image_policy must be auto, force or never, got {image_policy!r}")
        s = self.sampling_spec
        max_new_tokens = s.max_new_tokens if max_new_tokens is None else max_new_tokens
        temperature = s.temperature if temperature is None else temperature
        image_temperature = s.image_temperature if image_temperature is None else image_temperature
        top_k = s.top_k if top_k is None else top_k
        top_p = s.top_p if top_p is None else top_p
        cfg_scale = s.cfg_scale if cfg_scale is None else cfg_scale
        guided = cfg_scale != 1.0
        if guided:
            if uncond_prompts is None or len(uncond_prompts) != len(prompts):
                raise ValueError("cfg_scale != 1 needs one unconditional prompt per prompt (uncond_prompts)")
            if und_images is not None and any(im is not None for im in und_images):
                raise ValueError("classifier-free guidance is for text-to-image prompts; these prompts carry images")
        device = self.device
        generator = torch.Generator(device=device).manual_seed(s.seed if seed is None else seed)
        B = len(prompts)
        ids = self.ids
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
        embeds = self.embed_inputs(input_ids, und)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)

        cache = DynamicCache(config=self.lm.config) if use_cache else None
        hidden = self._decode_step(embeds, attention, positions, cache)
        all_embeds = embeds

        n_img = self.output_space.num_tokens
        mode = [TEXT] * B
        text_out: list[list[int]] = [[] for _ in range(B)]
        image_out: list[list[torch.Tensor]] = [[] for _ in range(B)]
        embed_tokens = self.lm.get_input_embeddings()
        stop_ids = {ids["end_turn"], ids["eos"]}
        while any(m != DONE for m in mode):
            next_embeds = embed_tokens(torch.full((R,), ids["pad"], device=device, dtype=torch.long)).clone()
            next_mask = torch.zeros(R, dtype=torch.long, device=device)
            text_rows = [i for i in range(B) if mode[i] == TEXT]
            image_rows = [i for i in range(B) if mode[i] == IMAGE]
            if text_rows:
                logits = self.lm.lm_head(hidden[text_rows]).float()
                if image_policy == "never":
                    logits[:, ids["image_start"]] = float("-inf")
                if image_policy == "force":
                    for sid in stop_ids:
                        logits[:, sid] = float("-inf")
                tokens = sample_logits(logits, temperature, top_k, top_p, generator).tolist()
                for row, token in zip(text_rows, tokens):
                    if image_policy == "force" and len(text_out[row]) + 1 >= max_new_tokens:
                        token = ids["image_start"]
                    text_out[row].append(token)
                    next_embeds[row] = embed_tokens(torch.tensor(token, device=device))
                    next_mask[row] = 1
                    if token == ids["image_start"] and image_policy != "never":
                        mode[row] = IMAGE
                    elif token in stop_ids or len(text_out[row]) >= max_new_tokens:
                        mode[row] = DONE
            if image_rows:
                rows_done = [i for i in image_rows if len(image_out[i]) == n_img]
                active = [i for i in image_rows if len(image_out[i]) < n_img]
                for row in rows_done:  # image complete: close it and stop
                    text_out[row].append(ids["image_end"])
                    next_embeds[row] = embed_tokens(torch.tensor(ids["image_end"], device=device))
                    next_mask[row] = 1
                    mode[row] = DONE
                if active:
                    pred = self.head(hidden[active])
                    if guided:
                        uncond = self.head(hidden[[i + B for i in active]])
                        pred = uncond.float() + cfg_scale * (pred.float() - uncond.float())
                    if self.output_space.discrete:
                        token = sample_logits(pred, image_temperature, top_k, top_p, generator)
                    else:
                        token = pred.float()
                    slots = torch.tensor([len(image_out[row]) for row in active], device=device)
                    feats = self.embed_generation_targets(token.unsqueeze(1), slots).squeeze(1)
                    for j, row in enumerate(active):
                        image_out[row].append(token[j].detach().cpu())
                        next_embeds[row] = feats[j].to(next_embeds.dtype)
                        next_mask[row] = 1
            if all(m == DONE for m in mode):
                break  # the final tokens are recorded; no need to run the LM on them
            if guided:  # the unconditional twins take the same tokens
                next_embeds[B:], next_mask[B:] = next_embeds[:B], next_mask[:B]
            attention = torch.cat([attention, next_mask[:, None]], dim=1)
            new_pos = positions[:, -1:] + 1
            positions = torch.cat([positions, new_pos], dim=1)
            step_embeds = next_embeds[:, None].to(all_embeds.dtype)
            if use_cache:
                hidden = self._decode_step(step_embeds, attention, new_pos, cache)
            else:
                all_embeds = torch.cat([all_embeds, step_embeds], dim=1)
                hidden = self._decode_step(all_embeds, attention, positions, None)
        return [
            Generated(text_ids=text_out[i], image_tokens=torch.stack(image_out[i]) if image_out[i] else None)
            for i in range(B)
        ]

    # ------------------------------------------------------------------ evaluation
    def answer_vqa(self, records: list[dict]) -> list[dict]:
        """Answer every human turn of every VQA record (earlier turns' ground truth as context)."""
        from unified_vlm.datamodules.collate import decode_answer

        jobs = []
        for rec in records:
            turns = rec["conversations"]
            for t in range(len(turns) // 2):
                jobs.append((rec, t, self.collator.encode_prompt(turns, t)))
        results = []
        for start in range(0, len(jobs), 64):
            chunk = jobs[start:start + 64]
            # cfg_scale 1: guidance is for text-to-image prompts; sampling.cfg_scale must not break answering
            outs = self.generate([p for _, _, p in chunk], [r["image"] for r, _, _ in chunk], image_policy="never", cfg_scale=1.0)
            for (rec, t, _), out in zip(chunk, outs):
                results.append(
                    {
                        "record_id": rec["id"],
                        "turn": t,
                        "question": rec["conversations"][2 * t]["value"],
                        "ground_truth": rec["conversations"][2 * t + 1]["value"],
                        "answer": decode_answer(self.tokenizer, out.text_ids),
                    }
                )
        return results

    def write_captions(self, records: list[dict]) -> list[dict]:
        """Caption every caption record's image from its first human turn (greedy, no image output)."""
        from unified_vlm.datamodules.collate import decode_answer

        results = []
        for start in range(0, len(records), 64):
            chunk = records[start:start + 64]
            prompts = [self.collator.encode_prompt(rec["conversations"], 0) for rec in chunk]
            outs = self.generate(prompts, [rec["image"] for rec in chunk], image_policy="never", max_new_tokens=CAPTION_TOKENS,
                                 cfg_scale=1.0)  # guidance is for text-to-image prompts
            for rec, out in zip(chunk, outs):
                results.append({"record_id": rec["id"], "prompt": rec["conversations"][0]["value"],
                                "reference": rec["conversations"][1]["value"],
                                "caption": decode_answer(self.tokenizer, out.text_ids),
                                "attributes": rec.get("attributes")})
        return results

    def generate_images(self, records: list[dict], **sampling: Any) -> list[Optional[torch.Tensor]]:
        """Generate one image per generation record from its first human turn; (3,H,W) in [0,1]."""
        prompts = [self.collator.encode_prompt(rec["conversations"], 0) for rec in records]
        cfg_scale = sampling.get("cfg_scale", self.sampling_spec.cfg_scale)
        if cfg_scale != 1.0:
            sampling["uncond_prompts"] = [self.collator.unconditional_prompt()] * len(prompts)
        outs = self.generate(prompts, image_policy="force", **sampling)
        images: list[Optional[torch.Tensor]] = [None] * len(outs)
        done = [i for i, o in enumerate(outs) if o.image_tokens is not None and len(o.image_tokens) == self.output_space.num_tokens]
        if done:
            decoded = self.output_space.decode(torch.stack([outs[i].image_tokens for i in done]).to(self.device))
            for i, img in zip(done, decoded):
                images[i] = img.cpu()
        return images

    def test_step(self, batch: list[dict], batch_idx: int) -> dict:
        vqa = [r for r in batch if r["task"] == "vqa"]
        gen = [r for r in batch if r["task"] == "generation"]
        captions = [r for r in batch if r["task"] == "caption"]
        out = {"vqa": self.answer_vqa(vqa) if vqa else [], "generation": [],
               "caption": self.write_captions(captions) if captions else []}
        if gen:
            for rec, img in zip(gen, self.generate_images(gen)):
                target = rec.get("image")
                out["generation"].append(
                    {
                        "record_id": rec["id"],
                        "prompt": rec["conversations"][0]["value"],
                        "image": img,
                        "target": target.cpu() if target is not None else None,
                        "attributes": rec.get("attributes"),
                    }
                )
        return out

    def predict_step(self, batch: list[dict], batch_idx: int) -> dict:
        return self.test_step(batch, batch_idx)

    # ------------------------------------------------------------------ checkpoints
    def parameter_table(self) -> list[dict[str, Any]]:
        """Trainable and frozen parameter counts per top-level module, with its policy."""
        policies = {
            "encoder": "frozen" if self.encoder_frozen else "full",
            "lm": self.backbone_policy,
            "output_space": "frozen",
        }
        rows, seen = [], set()
        for name, module in self.named_children():
            params = [p for p in module.parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)
            trainable = sum(p.numel() for p in params if p.requires_grad)
            frozen = sum(p.numel() for p in params if not p.requires_grad)
            if trainable + frozen == 0:
                continue
            shared = "+gen" if name == "und_projector" and self.shares_projector else ""  # one module, two roles
            policy = policies.get(name, "full")
            if name in self.frozen or (name == "lm" and "lora" in self.frozen):
                policy = "frozen" if name != "lm" or "lm" in self.frozen else "lora, frozen"
            rows.append({"module": name + shared, "policy": policy,
                         "trainable": trainable, "frozen": frozen})
        return rows

    def format_parameter_table(self) -> str:
        rows = self.parameter_table()
        lines = [f"{'module':<18}{'policy':<14}{'trainable':>12}{'frozen':>12}"]
        for r in rows:
            lines.append(f"{r['module']:<18}{r['policy']:<14}{r['trainable']:>12,}{r['frozen']:>12,}")
        lines.append(f"{'total':<32}{sum(r['trainable'] for r in rows):>12,}{sum(r['frozen'] for r in rows):>12,}")
        return "\n".join(lines)

    def on_fit_start(self) -> None:
        """Load ``init_from`` weights (fresh fits only), log the trainable/frozen table, save the tokenizer."""
        staged.load_init_weights(self)
        if self.trainer.is_global_zero:
            log.info("parameters per module:\n%s", self.format_parameter_table())
        # trainer.log_dir broadcasts from rank 0: every rank must read it, or DDP waits forever.
        log_dir = self.trainer.log_dir if self.trainer.logger is not None else None
        if self.trainer.is_global_zero and log_dir:
            self.tokenizer.save_pretrained(os.path.join(log_dir, "tokenizer"))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from unified_vlm.text_tokenizer import tokenizer_to_json

        checkpoint["text_tokenizer_json"] = tokenizer_to_json(self.tokenizer)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from unified_vlm.text_tokenizer import special_token_ids, tokenizer_from_json, tokenizer_to_json

        saved = checkpoint.get("text_tokenizer_json")
        if saved is not None and saved != tokenizer_to_json(self.tokenizer):
            log.warning("using the text tokenizer stored in the checkpoint (it differs from the configured one)")
            self.tokenizer = tokenizer_from_json(saved)
            self.ids = special_token_ids(self.tokenizer)
            self.collator.tokenizer = self.tokenizer
