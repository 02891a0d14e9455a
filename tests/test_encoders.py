"""Vision encoders (shape, gradients, resizing, token selection, save/load) and watch-attribute pretraining."""
import json
import math
import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from unified_vlm.datamodules.watch import WatchAttributes, sample_watch
from unified_vlm.models.encoders import OPTIONS_FILE, ClipEncoder, SiglipEncoder, TimmEncoder
from unified_vlm.pretraining.pretrain_encoder import (
    OUTPUTS,
    TOKEN_CHANNELS,
    AttributePretrainModule,
    WatchAttributeDataModule,
    attribute_metrics,
    attribute_targets,
    decode_time,
    load_or_pretrain_encoder,
    main,
    token_targets,
)
from unified_vlm.registry import ENCODERS

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
TINY_TIMM = dict(image_size=32, patch_size=8, model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})
# Every registered encoder, in a configuration whose output uses every parameter.
ALL_ENCODERS = {
    "siglip": dict(TINY, feature_select="pooled+patch"),
    "clip": dict(TINY, feature_layer=-1, feature_select="cls_patch"),
    "timm": dict(TINY_TIMM, feature_select="cls_patch"),
    "vq_codes": dict(weights="builtin"),  # frozen by design: codes are discrete
}
FROZEN_BY_DESIGN = {"vq_codes"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from 2 threads, and on the shared 2-core machine 2 threads next to
    another busy process ran 20x slower (conftest restores the thread count)."""
    torch.set_num_threads(1)


def images(batch=2, size=32, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(name, **overrides):
    torch.manual_seed(0)
    return ENCODERS.create(name, **{**ALL_ENCODERS[name], **overrides}).eval()


def test_every_encoder_is_covered():
    assert set(ENCODERS.list()) == set(ALL_ENCODERS)


@pytest.mark.parametrize("name", sorted(ALL_ENCODERS))
def test_forward_backward_contract(name):
    enc = build(name).train()
    out = enc(images())
    assert out.shape == (2, enc.num_tokens, enc.feature_dim)
    assert torch.isfinite(out).all()
    if name in FROZEN_BY_DESIGN:
        assert not any(p.requires_grad for p in enc.parameters()) and out.grad_fn is None
        assert not enc.training  # stays in eval mode under .train()
        return
    out.square().mean().backward()
    trainable = [(n, p) for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not missing, f"no/zero/NaN gradient for {missing}"


@pytest.mark.parametrize("name", sorted(ALL_ENCODERS))
def test_other_resolutions_are_resized_inside(name):
    enc = build(name)
    big = images(size=80)
    with torch.no_grad():
        direct = enc(big)
        size = (enc.image_size, enc.image_size)
        pre_resized = enc(F.interpolate(big, size=size, mode="bilinear", antialias=True, align_corners=False))
    assert direct.shape == (2, enc.num_tokens, enc.feature_dim)
    torch.testing.assert_close(direct, pre_resized)


@pytest.mark.parametrize(
    "name, select, expected",
    [
        ("siglip", "patch", 16), ("siglip", "cls_patch", 16), ("siglip", "pooled", 1), ("siglip", "pooled+patch", 17),
        ("clip", "patch", 16), ("clip", "cls_patch", 17),
        ("timm", "patch", 16), ("timm", "cls_patch", 17),
    ],
)
def test_feature_select_sets_num_tokens(name, select, expected):
    enc = build(name, feature_select=select)
    with torch.no_grad():
        out = enc(images())
    assert enc.num_tokens == expected == out.shape[1]


def test_patch_pool_averages_the_patch_grid_cell_by_cell():
    x = images()
    with torch.no_grad():
        full = build("siglip", feature_select="patch")(x)  # 32 px / 8 px patches: a 4x4 grid
        pooled = build("siglip", feature_select="pooled+patch", patch_pool=2)(x)
        pooled_token = build("siglip", feature_select="pooled")(x)
    enc = build("siglip", feature_select="pooled+patch", patch_pool=2)
    assert enc.num_tokens == 5 == pooled.shape[1]
    torch.testing.assert_close(pooled[:, 0], pooled_token[:, 0])
    grid = full.view(2, 4, 4, -1)
    cells = [grid[:, :2, :2], grid[:, :2, 2:], grid[:, 2:, :2], grid[:, 2:, 2:]]  # row-major: TL, TR, BL, BR
    for k, cell in enumerate(cells):
        torch.testing.assert_close(pooled[:, 1 + k], cell.mean(dim=(1, 2)))


@pytest.mark.parametrize("select, pool", [("pooled", 2), ("patch", 5), ("patch", 0)])
def test_patch_pool_needs_patch_tokens_and_a_grid_it_fits(select, pool):
    with pytest.raises(ValueError, match="patch_pool"):
        build("siglip", feature_select=select, patch_pool=pool)


def test_siglip_pooled_token_comes_first_then_the_patch_tokens():
    x = images()
    with torch.no_grad():
        both = build("siglip", feature_select="pooled+patch")(x)
        patch = build("siglip", feature_select="patch")(x)
        pooled = build("siglip", feature_select="pooled")(x)
    torch.testing.assert_close(both[:, 1:], patch)
    torch.testing.assert_close(both[:, :1], pooled)


def test_siglip_feature_layer_reads_that_hidden_state_and_freezes_what_follows():
    enc = build("siglip", feature_select="patch", feature_layer=-2)
    x = images()
    with torch.no_grad():
        hidden = enc.model(pixel_values=enc.preprocess(x), output_hidden_states=True).hidden_states
        torch.testing.assert_close(enc(x), hidden[-2])
    assert not any(p.requires_grad for p in enc.model.encoder.layers[-1].parameters())
    assert not any(p.requires_grad for p in enc.model.head.parameters())
    assert all(p.requires_grad for p in enc.model.encoder.layers[0].parameters())


def test_clip_patch_drops_only_the_cls_token():
    x = images()
    with torch.no_grad():
        assert torch.equal(build("clip", feature_select="cls_patch")(x)[:, 1:], build("clip", feature_select="patch")(x))


@pytest.mark.parametrize("name", ["siglip", "clip"])
def test_hf_save_load_round_trip_is_exact(name, tmp_path):
    enc = build(name, feature_select="patch" if name == "siglip" else "cls_patch")
    enc.save_pretrained(str(tmp_path))
    loaded = ENCODERS.get(name).from_pretrained(str(tmp_path)).eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(enc(x), loaded(x))
    assert (loaded.num_tokens, loaded.feature_dim, loaded.image_size) == (enc.num_tokens, enc.feature_dim, 32)


def test_siglip_saved_options_are_the_defaults_when_loading(tmp_path):
    build("siglip", feature_select="pooled+patch").save_pretrained(str(tmp_path), note="kept")
    saved = json.loads((tmp_path / OPTIONS_FILE).read_text())
    assert saved["feature_select"] == "pooled+patch" and saved["note"] == "kept"
    assert SiglipEncoder(weights=str(tmp_path)).num_tokens == 17
    assert SiglipEncoder(weights=str(tmp_path), feature_select="patch").num_tokens == 16


def test_timm_local_checkpoint_round_trip(tmp_path):
    from safetensors.torch import save_file

    enc = build("timm")
    path = str(tmp_path / "vit.safetensors")
    save_file(enc.model.state_dict(), path)
    torch.manual_seed(1)  # a different random init, so equality proves the file was loaded
    loaded = TimmEncoder(weights=path, **ALL_ENCODERS["timm"]).eval()
    with torch.no_grad():
        assert torch.equal(enc(images()), loaded(images()))


def test_timm_cnn_feature_maps_become_row_major_tokens():
    enc = TimmEncoder("mobilenetv3_small_050", image_size=64).eval()
    with torch.no_grad():
        tokens = enc(images(size=64))
        fmap = enc.model.forward_features(enc.preprocess(images(size=64)))
    assert tokens.shape == (2, 4, enc.feature_dim) == (2, enc.num_tokens, fmap.shape[1])
    assert torch.equal(tokens[:, 1], fmap[:, :, 0, 1])  # token 1 = row 0, column 1


def test_missing_or_wrong_weights_fail_with_the_path(tmp_path):
    missing = str(tmp_path / "nope")
    for factory in (SiglipEncoder, ClipEncoder):
        with pytest.raises(FileNotFoundError, match="nope"):
            factory(weights=missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        TimmEncoder(weights=missing)
    with pytest.raises(ValueError, match="pretrained=True"):
        TimmEncoder(pretrained=True)
    build("clip").save_pretrained(str(tmp_path / "clip"))
    with pytest.raises(ValueError, match="not a SigLIP"):
        SiglipEncoder(weights=str(tmp_path / "clip"))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_or_pretrain_encoder(missing)


# ------------------------------------------------------------------------ attribute pretraining
def test_token_targets_follow_the_render_geometry():
    attrs = WatchAttributes(hour=3, minute=0, second=30, weather="raining", battery=50, weather_pos="top-left",
                            battery_pos="bottom-right", face_color=(10, 20, 30))
    t = token_targets(attrs, size=64, grid=8).reshape(8, 8, len(TOKEN_CHANNELS))
    channel = {name: t[..., k] for k, name in enumerate(TOKEN_CHANNELS)}
    assert channel["raining"][0, 0] == 1 and channel["raining"][2:, :].sum() == 0 and channel["raining"][:, 2:].sum() == 0
    assert channel["sunny"].sum() == channel["cloudy"].sum() == 0
    assert channel["battery"][7, 6] == 1 and channel["battery"][:6].sum() == 0
    assert channel["minute_hand"][2:4, 3:5].all() and channel["minute_hand"][4:].sum() == 0  # 12 o'clock: up
    assert channel["second_hand"][4:7, 3:5].all() and channel["second_hand"][:4].sum() == 0  # 30 s: down
    assert channel["hour_hand"][3:5, 4:6].all() and channel["hour_hand"][:, :4].sum() == 0  # 3 o'clock: right


def test_time_decodes_exactly_from_the_angle_targets():
    attrs = [sample_watch(0, "val", i) for i in range(200)]
    hour, minute, second = decode_time(torch.stack([attribute_targets(a)["angles"] for a in attrs]))
    assert hour.tolist() == [a.hour % 12 for a in attrs]
    assert minute.tolist() == [a.minute for a in attrs]
    assert second.tolist() == [a.second for a in attrs]


def test_metrics_are_perfect_for_perfect_outputs_and_score_circularly():
    attrs = [sample_watch(0, "val", i) for i in range(16)]
    batch = {k: torch.stack([attribute_targets(a)[k] for a in attrs]) for k in OUTPUTS}
    out = {k: F.one_hot(batch[k], n).float() for k, n in OUTPUTS.items() if k not in ("battery", "angles")}
    out.update(battery=batch["battery"][:, None], angles=batch["angles"])
    metrics = attribute_metrics(out, batch)
    assert all(math.isclose(float(v), 0.0 if k == "battery_abs_err" else 1.0, abs_tol=1e-5) for k, v in metrics.items())
    out["minute"] = F.one_hot((batch["minute"] + 59) % 60, 60).float()  # off by one minute, circularly
    off = attribute_metrics(out, batch)
    assert off["minute_pm2"] == 1 and math.isclose(float(off["time_score"]), 1 - 1 / 90, rel_tol=1e-5)
    assert off["angle_time_score"] == 1


def tiny_module(**kw):
    torch.manual_seed(0)
    return AttributePretrainModule(**{**TINY, "warmup_steps": 1, **kw})


def test_pretraining_steps_reduce_the_loss_on_a_fixed_batch():
    module = tiny_module()
    batch = next(iter(WatchAttributeDataModule(image_size=32, patch_size=8, batch_size=16).train_dataloader()))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["tokens"].shape == (16, 16, len(TOKEN_CHANNELS))
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss, _ = module.losses(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_trainer_fit_runs_and_logs_per_attribute_validation(tmp_path):
    module = tiny_module(max_steps=2)
    data = WatchAttributeDataModule(image_size=32, patch_size=8, batch_size=4, val_size=8)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, precision="bf16-mixed", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    for src in ("pooled", "mean"):
        for name in ("weather", "weather_pos", "battery_pos", "battery_abs_err", "hour_acc", "minute_pm2", "time_score"):
            assert f"val/{src}/{name}" in trainer.callback_metrics


def test_main_pretrains_saves_and_the_cache_is_reused(tmp_path, capsys):
    args = ["--image-size", "32", "--patch-size", "8", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2",
            "--intermediate-size", "64", "--batch-size", "8", "--val-size", "8", "--minutes", "0.05"]
    assert main(["--out", str(tmp_path / "enc"), *args]) == 0
    printed = capsys.readouterr().out
    assert "weather_pos" in printed and "time_score" in printed
    saved = json.loads((tmp_path / "enc" / OPTIONS_FILE).read_text())
    assert saved["feature_select"] == "pooled+patch" and saved["render_size"] == 32
    assert 0 <= saved["pretrain"]["val"]["val/pooled/weather"] <= 1
    assert "val/pooled/weather_pos" in (tmp_path / "enc" / "pretrain_logs" / "metrics.csv").read_text().splitlines()[0]
    assert SiglipEncoder(weights=str(tmp_path / "enc")).num_tokens == 17

    cache = tmp_path / "cache" / "enc"
    kwargs = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    path = load_or_pretrain_encoder(None, cache_dir=str(cache), max_minutes=0.02, batch_size=8, val_size=8, **kwargs)
    assert path == str(cache) and (cache / "config.json").is_file()
    assert [p.name for p in cache.parent.iterdir()] == ["enc"]  # the temp dir was renamed, nothing left over
    stamp = os.path.getmtime(cache / "config.json")
    assert load_or_pretrain_encoder(None, cache_dir=str(cache), **kwargs) == str(cache)
    assert os.path.getmtime(cache / "config.json") == stamp
    assert load_or_pretrain_encoder(str(cache)) == str(cache)


def test_vq_codes_are_the_tokenizers_unit_norm_code_vectors():
    enc = build("vq_codes")
    x = images(size=64)
    with torch.no_grad():
        feats = enc(x)
        expected = enc.tokenizer.code_features(enc.tokenizer.encode(x))
    assert feats.shape == (2, 64, 8)
    torch.testing.assert_close(feats, expected.float())
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2, 64))


def test_vq_codes_without_weights_is_refused():
    with pytest.raises(ValueError, match="vq_codes"):
        ENCODERS.create("vq_codes", weights=None)
