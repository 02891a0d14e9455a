"""UnifiedVLM: one language backbone that answers questions about images and generates images.

Understanding: encoder tokens -> understanding projector -> spliced into the LM's input
embeddings at IMAGE_PAD slots. Generation: ground-truth image tokens (VQ codes) are
teacher-forced through the generation projector at GEN_PAD slots, and an output head reads the
hidden state *before* each slot to predict that slot's token. Loss = text CE + alpha * image
loss (docs/paper.md 2.5 and 3.1).

This module composes the parts and computes the loss. Beside it: ``losses`` (the two losses),
``generation`` (the decoding loop and samplers behind ``generate``), ``feature_norm``,
``builders`` (parts from specs and their compatibility checks), ``schedules`` and
``parameter_table``; the chat format is ``unified_vlm.chat_format``; the record-level tasks
that ``test_step``/``predict_step`` run are ``unified_vlm.evaluation.record_tasks``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import lightning as L
import torch
from torch import nn

from unified_vlm.chat_format import ChatFormat, check_prompt_dropout
from unified_vlm.models import decoding, losses, parameter_table, staged, trainable_checkpoint
from unified_vlm.models.backbones import apply_training_policy
from unified_vlm.models.builders import (
    build_encoder,
    build_output_space,
    build_text_tokenizer,
    check_head_fits_space,
    projector_sharing,
)
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
from unified_vlm.models.decoding import Generated
from unified_vlm.models.distortion import build_distortion
from unified_vlm.models.feature_norm import build_feature_norm
from unified_vlm.models.projectors import TokenSlotEmbedding
from unified_vlm.models.schedules import warmup_cosine_over
from unified_vlm.registry import BACKBONES, HEADS, PROJECTORS
from unified_vlm.text_tokenizer import special_token_ids, tokenizer_from_json, tokenizer_to_json

log = logging.getLogger(__name__)


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
            strength, seed, translation; docs/paper.md 5.2 b); null = none. Generation is untouched.
        init_from: start ``fit`` from the model weights of this checkpoint (not its optimizer or
            step); loaded at fit start unless the fit resumes from its own checkpoint.
        freeze: modules that get no gradient and stay in eval mode: und_projector, gen_projector,
            und_token_embedding, und_feature_norm, head, lm (all of it) or lora (its adapters).
        checkpoint_weights: ``all`` (every weight) or ``trainable`` (the frozen parameters are left
            out and rebuilt from the model's own base files at load, after a fingerprint check;
            ``trainable_checkpoint.py``): for LoRA on a large frozen backbone.

    ``chat_format`` encodes conversations for this model (the data module batches records in it);
    ``record_tasks`` is what ``test_step``/``predict_step`` run (see ``test_step``).
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
        checkpoint_weights: str = "all",
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
                "checkpoint_weights": checkpoint_weights,
            }
        )
        self.optim_spec, self.sampling_spec = optim, sampling
        if text_loss_average not in losses.TEXT_LOSS_AVERAGES:
            raise ValueError(f"text_loss_average must be 'token' or 'turn', got {text_loss_average!r}")
        self.text_loss_average = text_loss_average
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
        share, why = projector_sharing(encoder, image_output, self.encoder.feature_dim, self.output_space.feature_dim)
        if share:
            self.gen_projector = self.und_projector
        else:
            self.gen_projector = PROJECTORS.create(
                image_output.projector, in_dim=self.output_space.feature_dim, out_dim=hidden
            )
        self.shares_projector = share
        self.gen_token_embedding = (
            TokenSlotEmbedding(self.output_space.num_tokens, hidden) if image_output.position_embedding == "learned" else None
        )
        log.info("generation inputs %s the understanding projector (%s)", "share" if share else "do not share", why)
        check_head_fits_space(image_output, self.output_space.discrete)
        head_options = dict(image_output.head_options)
        if self.output_space.discrete:
            self.head = HEADS.create(image_output.head, hidden_size=hidden, codebook_size=self.output_space.target_size, **head_options)
        else:
            self.head = HEADS.create(image_output.head, hidden_size=hidden, feature_dim=self.output_space.feature_dim, **head_options)
        self.alpha = image_output.loss_weight
        self.prompt_dropout = check_prompt_dropout(image_output.prompt_dropout)  # applied by the data's collator
        if sampling.cfg_scale != 1.0 and self.prompt_dropout == 0:
            log.warning("sampling.cfg_scale %g with image_output.prompt_dropout 0: guidance needs a model trained "
                        "on emptied prompts, so it has nothing to work with here", sampling.cfg_scale)
        self.chat_format = ChatFormat(self.tokenizer, self.encoder.num_tokens, self.output_space.num_tokens, max_length)
        self.record_tasks: Optional[Callable[["UnifiedVLM", list[dict]], dict]] = None
        self.init_from = init_from
        self.checkpoint_weights = trainable_checkpoint.check_mode(checkpoint_weights)
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

        text_loss, text_count = losses.text_loss(self.lm.lm_head(hidden[:, :-1]), labels[:, 1:], self.text_loss_average,
                                                 self.ids["end_turn"])
        if gen_targets is not None:
            image_loss, image_count = losses.image_loss(self.head, hidden, input_ids[:, 1:] == self.ids["gen_pad"], gen_targets)
        else:
            image_loss, image_count = text_loss.new_zeros(()), text_count.new_zeros(())
        # Means over the optimiser step's whole batch, not per rank or micro-batch (docs/training_safety.md).
        step_counts = batch.get("step_counts") if self.training else None
        if step_counts is not None:
            step_counts = step_counts[[0 if self.text_loss_average == "token" else 1, 2]]  # (tokens, turns, image slots)
        text_loss, image_loss = losses.global_batch_means(
            (text_loss, image_loss), (text_count, image_count), distributed=self.training, step_counts=step_counts,
            accumulate=self.trainer.accumulate_grad_batches if self._trainer is not None else 1,
        )
        # Every trainable parameter of a side the batch did not use joins the graph with a zero weight (DDP).
        understood = batch.get("und_pixel_values") is not None and bool((input_ids == self.ids["image_pad"]).any())
        und_parts = (self.encoder, self.und_distortion, self.und_feature_norm, self.und_projector, self.und_token_embedding)
        gen_parts = (self.gen_projector, self.gen_token_embedding, self.head)
        if not understood:
            text_loss = text_loss + losses.zero_weight(losses.idle_parameters(und_parts, gen_parts if gen_targets is not None else ()))
        if gen_targets is None:
            image_loss = image_loss + losses.zero_weight(losses.idle_parameters(gen_parts, und_parts if understood else ()))
        return {"loss": text_loss + self.alpha * image_loss, "text_loss": text_loss, "image_loss": image_loss}

    def text_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy, averaged as ``text_loss_average`` says (``losses.text_loss``)."""
        return losses.text_loss(logits, targets, self.text_loss_average, self.ids["end_turn"])[0]

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
        schedule = warmup_cosine_over(self.trainer.estimated_stepping_batches, spec.warmup_ratio, spec.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ generation and evaluation
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
        cache: str = "static",
    ) -> list[Generated]:
        """Batched prefill-then-decode over text and image tokens: ``decoding.generate`` (its
        docstring says how); prompts are token ids (``self.chat_format.encode_prompt``), settings
        left None come from ``model.sampling``."""
        return decoding.generate(self, prompts, und_images, max_new_tokens, image_policy, temperature, image_temperature,
                                   top_k, top_p, seed, use_cache, cfg_scale, uncond_prompts, cache)

    def test_step(self, batch: list[dict], batch_idx: int) -> dict:
        """Answer, caption and draw a batch of test records with ``self.record_tasks``.

        The record-level tasks live on the evaluation side (``unified_vlm.evaluation.record_tasks``;
        ``run_records`` there is the default); the CLI's ``EvaluationReport`` and ``PredictionWriter``
        callbacks attach it at setup. With a bare Trainer: ``record_tasks.attach(model)`` first."""
        if self.record_tasks is None:
            raise RuntimeError(
                "UnifiedVLM.test_step/predict_step need the record-level tasks: call "
                "unified_vlm.evaluation.record_tasks.attach(model) first, or use the EvaluationReport / "
                "PredictionWriter callbacks (the CLI always does)"
            )
        return self.record_tasks(self, batch)

    def predict_step(self, batch: list[dict], batch_idx: int) -> dict:
        return self.test_step(batch, batch_idx)

    # ------------------------------------------------------------------ checkpoints
    def parameter_table(self) -> list[dict[str, Any]]:
        """Trainable and frozen parameter counts per top-level module, with its policy."""
        return parameter_table.rows(self)

    def format_parameter_table(self) -> str:
        return parameter_table.format_rows(self.parameter_table())

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
        checkpoint["text_tokenizer_json"] = tokenizer_to_json(self.tokenizer)
        if self.checkpoint_weights == "trainable":
            trainable_checkpoint.prune(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        trainable_checkpoint.restore(self, checkpoint)  # a trainable-only checkpoint gets this model's frozen base
        saved = checkpoint.get("text_tokenizer_json")
        if saved is not None and saved != tokenizer_to_json(self.tokenizer):
            log.warning("using the text tokenizer stored in the checkpoint (it differs from the configured one)")
            self.tokenizer = tokenizer_from_json(saved)
            self.ids = special_token_ids(self.tokenizer)
            self.chat_format.tokenizer = self.tokenizer  # shared with the data's collator
