"""SigLIP-style sigmoid-contrastive pretraining: loss, data, gradients, save/load, CLI."""
import json
import math
import os

import pytest
import torch

from unified_vlm.cli import main as cli_main
from unified_vlm.files import publish_dir
from unified_vlm.models.encoders import OPTIONS_FILE, SiglipEncoder
from unified_vlm.pretraining.pretrain_contrastive import (
    TEXT_TOWER_DIR,
    SigmoidContrastiveModule,
    WatchCaptionDataModule,
    WatchCaptionDataset,
    load_text_tower,
    load_tokenizer,
    same_text,
    save_contrastive,
    sigmoid_contrastive_loss,
    tokenize,
    weather_prompts,
)
from unified_vlm.registry import ENCODERS

TINY = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
        "text_hidden_size": 32, "text_layers": 1, "text_heads": 2, "text_intermediate_size": 64, "max_text_len": 64}
TINY_ARGS = ["--image-size", "32", "--patch-size", "8", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2",
             "--intermediate-size", "64", "--text-hidden-size", "32", "--text-layers", "1", "--text-heads", "2",
             "--text-intermediate-size", "64", "--batch-size", "4", "--val-size", "8", "--threads", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # conftest restores it


def tiny_module(**kw):
    torch.manual_seed(0)
    return SigmoidContrastiveModule(**{**TINY, "warmup_steps": 1, **kw})


def tiny_batch(size=8):
    return next(iter(WatchCaptionDataModule(image_size=32, batch_size=size).train_dataloader()))


def log_sigmoid(v):
    return -math.log1p(math.exp(-v))


def test_loss_matches_the_hand_computed_2x2_case():
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised inside: e1, e2
    y = torch.tensor([[5.0, 0.0], [3.0, 4.0]])  # e1, (0.6, 0.8)
    scale, bias = torch.tensor(math.log(10)), torch.tensor(-10.0)
    # logits t<x_i, y_j> + b = [[0, -4], [-10, -2]]; z = +1 on the diagonal, -1 off it; sum over pairs / |B|
    expected = -(log_sigmoid(0) + log_sigmoid(4) + log_sigmoid(10) + log_sigmoid(-2)) / 2
    assert math.isclose(float(sigmoid_contrastive_loss(x, y, scale, bias)), expected, rel_tol=1e-6)
    everything = torch.ones(2, 2, dtype=torch.bool)  # e.g. two identical captions: all pairs positive
    expected_all = -(log_sigmoid(0) + log_sigmoid(-4) + log_sigmoid(-10) + log_sigmoid(-2)) / 2
    assert math.isclose(float(sigmoid_contrastive_loss(x, y, scale, bias, everything)), expected_all, rel_tol=1e-6)
    module = tiny_module()
    assert math.isclose(module.logit_scale.exp().item(), 10, rel_tol=1e-6) and module.logit_bias.item() == -10


def test_data_is_deterministic_tokenized_and_duplicates_are_positives():
    tok = load_tokenizer()
    a, b = WatchCaptionDataset(tok, "train", 4, image_size=32), WatchCaptionDataset(tok, "train", 4, image_size=32)
    assert [a.text(i) for i in range(4)] == [b.text(i) for i in range(4)]
    assert "smart watch" in a.text(0) and a.text(0) != a.text(1)
    item = a[0]
    assert item["image"].shape == (3, 32, 32) and 0 <= item["image"].min() and item["image"].max() <= 1
    n = int(item["attention_mask"].sum())
    assert item["input_ids"][n - 1] == tok.eos_token_id and (item["input_ids"][n:] == tok.pad_token_id).all()
    assert tok.decode(item["input_ids"][: n - 1]) == a.text(0)
    both = WatchCaptionDataset(tok, "train", 4, image_size=32, text_source="both")
    assert both.text(0) == a.text(0) and both.text(1) != a.text(1) and both.text(1).startswith(("Can", "Please"))
    assert len(weather_prompts("caption")["sunny"]) == 9 and all("sunny" in t for t in weather_prompts("both")["sunny"])

    ids, _ = tokenize(tok, ["a watch.", "b watch.", "a watch."], 16)
    assert same_text(ids).tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    module = tiny_module()
    assert module.positives({"input_ids": ids}).equal(same_text(ids))
    assert tiny_module(mask_duplicate_captions=False).positives({"input_ids": ids}) is None


def test_retrieval_counts_an_identical_caption_as_a_hit():
    module = tiny_module()
    feats = torch.eye(4, 32)  # the tower's width
    ids = torch.tensor([[5, 1], [5, 1], [6, 1], [7, 1]])  # captions 0 and 1 are the same text
    swapped = feats[[1, 0, 2, 3]]  # image 0 is closest to text 1 and vice versa
    metrics = module.retrieval_metrics(swapped, feats, ids, torch.zeros(4, dtype=torch.long))
    assert float(metrics["i2t_top1"]) == float(metrics["t2i_top1"]) == 1.0
    wrong = feats[[2, 0, 3, 1]]
    assert float(module.retrieval_metrics(wrong, feats, ids, torch.zeros(4, dtype=torch.long))["i2t_top1"]) == 0.25
    assert 0 <= float(metrics["zeroshot_weather"]) <= 1


def test_every_trainable_parameter_gets_a_finite_gradient():
    module = tiny_module()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = module.losses(tiny_batch(4))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
    assert module.logit_scale.grad.abs() > 0 and module.logit_bias.grad.abs() > 0


def test_steps_reduce_the_loss_and_the_saved_towers_reload_exactly(tmp_path):
    module = tiny_module()
    batch = tiny_batch(8)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss, _ = module.losses(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0], losses

    module.eval()
    save_contrastive(module, tmp_path / "enc", pretrain={"note": "kept"})
    saved = json.loads((tmp_path / "enc" / OPTIONS_FILE).read_text())
    assert saved["feature_select"] == "pooled+patch" and saved["render_size"] == 32
    assert saved["pretrain"] == {"objective": "sigmoid_contrastive", "note": "kept"}
    images = batch["image"][:3]
    with torch.no_grad():
        trained = module.encode_image(images)
        for loaded in (SiglipEncoder.from_pretrained(str(tmp_path / "enc")), ENCODERS.create("siglip", weights=str(tmp_path / "enc"))):
            loaded.eval()
            assert loaded.num_tokens == 17
            assert torch.allclose(loaded.encode(images)["pooled"], trained, atol=1e-6)
        text_model, tok, info = load_text_tower(tmp_path / "enc" / TEXT_TOWER_DIR)
        ids, mask = batch["input_ids"][:3], batch["attention_mask"][:3]
        assert torch.allclose(text_model.eval()(input_ids=ids, attention_mask=mask).pooler_output,
                              module.encode_text(ids, mask), atol=1e-6)
    assert len(tok) == len(module.tokenizer) and math.isclose(info["logit_bias"], float(module.logit_bias), rel_tol=1e-6)


def test_cli_trains_saves_atomically_and_refuses_a_non_empty_out_dir(tmp_path, capsys):
    out = tmp_path / "enc"
    assert cli_main(["pretrain-contrastive", "--out", str(out), "--max-steps", "2", *TINY_ARGS]) == 0
    printed = capsys.readouterr().out
    assert "i2t_top1" in printed and "zeroshot_weather" in printed and "saved to" in printed
    assert [p.name for p in tmp_path.iterdir()] == ["enc"]  # the temp dir was renamed, nothing left over
    saved = json.loads((out / OPTIONS_FILE).read_text())
    assert saved["pretrain"]["objective"] == "sigmoid_contrastive" and saved["pretrain"]["hparams"]["max_steps"] == 2
    assert 0 <= saved["pretrain"]["val"]["val/i2t_top1"] <= 1 and saved["pretrain"]["val"]["val/gallery"] == 8
    assert "val/zeroshot_weather" in (out / "pretrain_logs" / "metrics.csv").read_text().splitlines()[0]
    assert ENCODERS.create("siglip", weights=str(out)).num_tokens == 17
    assert (out / TEXT_TOWER_DIR / "config.json").is_file()

    with pytest.raises(SystemExit) as exc:
        cli_main(["pretrain-contrastive", "--out", str(out), "--max-steps", "2", *TINY_ARGS])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "is not empty" in err and "--overwrite" in err
    assert (out / "config.json").is_file()  # untouched


def test_replacing_a_non_empty_dir_leaves_nothing_behind(tmp_path):
    old = tmp_path / "out"
    old.mkdir()
    (old / "stale.txt").write_text("x")
    publish_dir(lambda tmp: open(os.path.join(tmp, "config.json"), "w").write("{}"), str(old), "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in old.iterdir()] == ["config.json"]
