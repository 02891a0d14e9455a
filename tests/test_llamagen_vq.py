"""LlamaGen VQ-16 re-implementation: real checkpoint key names, tokenizer contract, loading and its errors."""
import argparse

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from unified_vlm.models.llamagen_vq import AttnBlock, LlamaGenVQ, LlamaGenVQConfig, load_llamagen_state_dict
from unified_vlm.models.output_spaces import VQOutputSpace


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # conftest restores it


# The VQ-16 layout at 1/4 width and a 64 px input: 4x4 = 16 tokens, well under a second a pass.
TINY = {"image_size": 64, "ch": 32, "z_channels": 32, "codebook_size": 64}

# Key names and shapes of LlamaGen's VQ_16 (tokenizer/tokenizer_image/vq_model.py, ch=128).
REAL_KEYS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.conv_blocks.0.res.0.norm1.weight": (128,),
    "encoder.conv_blocks.0.res.1.conv2.bias": (128,),
    "encoder.conv_blocks.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.conv_blocks.4.res.0.nin_shortcut.weight": (512, 256, 1, 1),
    "encoder.conv_blocks.4.attn.1.q.weight": (512, 512, 1, 1),
    "encoder.conv_blocks.4.attn.0.proj_out.bias": (512,),
    "encoder.mid.0.norm2.weight": (512,),
    "encoder.mid.1.k.weight": (512, 512, 1, 1),
    "encoder.mid.1.norm.bias": (512,),
    "encoder.mid.2.conv1.weight": (512, 512, 3, 3),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (256, 512, 3, 3),
    "quant_conv.weight": (8, 256, 1, 1),
    "quantize.embedding.weight": (16384, 8),
    "post_quant_conv.weight": (256, 8, 1, 1),
    "decoder.conv_in.weight": (512, 256, 3, 3),
    "decoder.mid.1.v.weight": (512, 512, 1, 1),
    "decoder.conv_blocks.0.res.2.conv1.weight": (512, 512, 3, 3),
    "decoder.conv_blocks.0.attn.2.q.weight": (512, 512, 1, 1),
    "decoder.conv_blocks.0.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.conv_blocks.3.res.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.conv_blocks.4.res.2.conv2.weight": (128, 128, 3, 3),
    "decoder.norm_out.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}
ABSENT = [
    "encoder.conv_blocks.4.downsample.conv.weight",  # no downsample after the last level
    "decoder.conv_blocks.4.upsample.conv.weight",  # nor an upsample after the finest one
    "encoder.conv_blocks.3.attn.0.q.weight",  # attention only at the coarsest level
    "encoder.conv_blocks.0.res.0.nin_shortcut.weight",
]


def tiny(**overrides) -> LlamaGenVQ:
    torch.manual_seed(0)
    return LlamaGenVQ(LlamaGenVQConfig(**{**TINY, **overrides})).eval()


def images(n: int = 2, size: int = 64) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(n, 3, size, size)


def test_full_vq16_matches_llamagen_key_names_and_shapes():
    with torch.device("meta"):
        model = LlamaGenVQ()
    state = model.state_dict()
    for key, shape in REAL_KEYS.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    assert not [k for k in ABSENT if k in state]
    assert len(state) == 343
    assert sum(p.numel() for p in model.parameters()) == 71_883_403  # LlamaGen reports ~72M for VQ-16
    assert (model.num_tokens, model.grid, model.codebook_size, model.code_dim) == (256, (16, 16), 16384, 8)


def test_attention_matches_llamagen_bmm_math():
    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    x = torch.randn(2, 32, 4, 4)
    h_ = block.norm(x)
    q, k, v = block.q(h_), block.k(h_), block.v(h_)
    b, c, h, w = q.shape
    w_ = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w)) * c**-0.5
    ref = x + block.proj_out(torch.bmm(v.reshape(b, c, h * w), F.softmax(w_, dim=2).permute(0, 2, 1)).reshape(b, c, h, w))
    torch.testing.assert_close(block(x), ref)


def test_tokenizer_contract():
    model = tiny()
    codes = model.encode(images())
    assert codes.shape == (2, model.num_tokens) == (2, 16) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < model.codebook_size
    assert torch.equal(model.encode(images()), codes)  # deterministic
    assert model.encode(images(size=96)).shape == codes.shape  # other sizes are resized first

    feats = model.code_features(codes)
    assert feats.shape == (2, 16, 8)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2, 16))
    torch.testing.assert_close(feats, F.normalize(model.quantize.embedding.weight, dim=-1)[codes])

    recon = model.decode(codes).detach()
    assert recon.shape == (2, 3, 64, 64) and 0 <= float(recon.min()) and float(recon.max()) <= 1
    assert model.encode(recon).shape == codes.shape
    with pytest.raises(ValueError, match="expected codes"):
        model.decode(codes[:, :5])


def test_encode_picks_the_nearest_normalised_code():
    model = tiny()
    z = F.normalize(model._latents(images()), dim=-1)
    book = F.normalize(model.quantize.embedding.weight, dim=-1)
    expected = (z @ book.t()).argmax(-1)  # unit vectors: min distance == max cosine
    assert torch.equal(model.encode(images()), expected)


def test_vq_output_space_wraps_it():
    space = VQOutputSpace(tiny())
    targets = space.targets(images())
    assert (space.num_tokens, space.feature_dim, space.target_size) == (16, 8, 64)
    assert space.input_features(targets).shape == (2, 16, 8)
    assert space.decode(targets).shape == (2, 3, 64, 64)


@pytest.mark.parametrize("layout", ["model", "bare", "safetensors", "training"])
def test_checkpoint_round_trip(tmp_path, layout):
    model = tiny()
    state = model.state_dict()
    if layout == "safetensors":
        path = tmp_path / "vq.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "vq_ds16_c2i.pt"
        if layout == "model":  # as LlamaGen releases it, with the usage buffer of codebook_show_usage=True
            obj = {"model": {**state, "quantize.codebook_used": torch.zeros(65536)}}
        elif layout == "training":  # a full LlamaGen training checkpoint pickles argparse args
            obj = {"model": state, "optimizer": {}, "steps": 10, "args": argparse.Namespace(vq_model="VQ-16")}
        else:
            obj = state
        torch.save(obj, path)
    loaded = LlamaGenVQ.from_checkpoint(path, **TINY)
    assert not loaded.training
    codes = model.encode(images())
    assert torch.equal(loaded.encode(images()), codes)
    torch.testing.assert_close(loaded.decode(codes), model.decode(codes), rtol=0, atol=0)


def test_codebook_usage_buffer_is_optional_both_ways(tmp_path):
    path = tmp_path / "vq.pt"
    torch.save({"model": tiny().state_dict()}, path)
    loaded = LlamaGenVQ.from_checkpoint(path, codebook_show_usage=True, **TINY)
    assert loaded.quantize.codebook_used.shape == (65536,)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "vq_ds16_c2i.pt"
    with pytest.raises(FileNotFoundError, match="nope"):
        LlamaGenVQ.from_checkpoint(path, **TINY)


def test_wrong_keys_or_shapes_are_named(tmp_path):
    state = tiny().state_dict()
    state["encoder.conv_in.weights"] = state.pop("encoder.conv_in.weight")
    torch.save({"model": state}, tmp_path / "keys.pt")
    with pytest.raises(ValueError, match=r"does not hold a LlamaGen VQ-16.*missing keys \['encoder.conv_in.weight'\]"
                       r".*unexpected keys \['encoder.conv_in.weights'\]"):
        LlamaGenVQ.from_checkpoint(tmp_path / "keys.pt", **TINY)

    torch.save({"model": tiny().state_dict()}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"quantize.embedding.weight: file \(64, 8\) vs model \(128, 8\)"):
        LlamaGenVQ.from_checkpoint(tmp_path / "shape.pt", **{**TINY, "codebook_size": 128})
    with pytest.raises(ValueError, match="shape mismatches"):  # the tiny file is not the default VQ-16
        LlamaGenVQ.from_checkpoint(tmp_path / "shape.pt", image_size=64)


def test_bad_inputs_are_explained(tmp_path):
    torch.save({"steps": 3}, tmp_path / "nostate.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_llamagen_state_dict(tmp_path / "nostate.pt")
    with pytest.raises(ValueError, match="GroupNorm"):
        LlamaGenVQConfig(ch=16)
    with pytest.raises(ValueError, match="not divisible"):
        LlamaGenVQConfig(image_size=200)
    with pytest.raises(ValueError, match="unknown LlamaGenVQConfig"):
        LlamaGenVQ.from_checkpoint(tmp_path / "nostate.pt", channels=3)
