"""vit.py: an OpenAI block, every checkpoint format, bad files (parity with Hugging Face: test_dfdhr.py)."""
import json

import pytest
import torch
from torch import nn

from vit import Block, CheckpointError, VisionTransformer, explicit_attention, load_clip

transformers = pytest.importorskip("transformers")

TINY_VIT = dict(image_size=32, patch_size=8, width=64, layers=3, heads=2, output_dim=48)  # head width 32, not 64


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return VisionTransformer(**{**TINY_VIT, **overrides}).eval()


def images(n=2, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class OpenAIBlock(nn.Module):
    """OpenAI's block as CLIP builds it: nn.MultiheadAttention on (N, B, D), the MLP written out."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(width, 4 * width), c_proj=nn.Linear(4 * width, width)))

    def forward(self, x):  # (B, N, D)
        x = x.transpose(0, 1)  # NLD -> LND
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.mlp["c_fc"](self.ln_2(x))
        x = x + self.mlp["c_proj"](h * torch.sigmoid(1.702 * h))
        return x.transpose(0, 1)


def test_block_matches_openai_block():
    torch.manual_seed(0)
    ours = Block(width=64, heads=4).eval()
    for p in ours.parameters():  # non-trivial norms and biases
        nn.init.normal_(p, std=0.2)
    ref = OpenAIBlock(64, 4).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # same parameter names
    x = torch.randn(3, 17, 64)
    assert (ours(x) - ref(x)).abs().max() < 1e-5


@pytest.mark.parametrize("cls", ["CLIPVisionModel", "CLIPModel"])
def test_hugging_face_other_classes(tmp_path, cls, hf_clip):
    if cls == "CLIPModel":
        config = transformers.CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
            vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                               patch_size=8, image_size=32, hidden_act="quick_gelu"), projection_dim=40)
        torch.manual_seed(0)
        hf = transformers.CLIPModel(config).eval()
    else:
        hf = hf_clip(width=64, layers=2, heads=2, patch=8, image=32, proj=48, cls=cls)
    hf.save_pretrained(tmp_path)
    ours = load_clip(tmp_path / "model.safetensors").eval()
    x = images(2)
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=x) if cls == "CLIPModel" else hf(pixel_values=x).pooler_output
        ref = getattr(ref, "pooler_output", ref)
        assert (ours(x) - ref).abs().max() < 1e-4


class FullCLIP(nn.Module):
    """An OpenAI-layout CLIP: the image encoder under `visual.` beside a stand-in text tower."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.token_embedding = nn.Embedding(10, 8)

    def forward(self, x):
        return self.visual(x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_openai_formats_round_trip(tmp_path):
    model = tiny_model()
    x = images()
    with torch.no_grad():
        want = model(x)
    full = FullCLIP(model)
    torch.jit.save(torch.jit.trace(full, x), tmp_path / "ViT-tiny.pt")  # OpenAI's TorchScript archive
    torch.save(full.state_dict(), tmp_path / "full.pt")  # full CLIP, `visual.` prefix
    torch.save(model.state_dict(), tmp_path / "visual.pt")  # image encoder only, no prefix
    for path in ("ViT-tiny.pt", "full.pt", "visual.pt"):
        (tmp_path / path).with_suffix(".json").write_text('{"heads": 2}')  # TINY_VIT breaks OpenAI's rule
        with torch.no_grad():
            got = load_clip(tmp_path / path, heads=2)(x)
        assert torch.equal(got, want), path
    fp16 = {k: v.half() for k, v in model.state_dict().items()}
    loaded = load_clip(fp16, heads=2)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    rounded = tiny_model()
    rounded.load_state_dict({k: v.float() for k, v in fp16.items()})
    with torch.no_grad():
        assert torch.equal(loaded(x), rounded(x))


def test_heads_default_to_openai_rule():
    model = load_clip(tiny_model(width=128, heads=2).state_dict())
    assert model.heads == 2  # 128 // 64


def test_hidden_states_end_in_forward():
    model, x = tiny_model(), images()
    with torch.no_grad():
        states = model.hidden_states(x)
        assert len(states) == TINY_VIT["layers"] + 1
        assert torch.allclose(model.project(states[-1][:, 0]), model(x), atol=1e-6)


def test_bf16_autocast_close_to_fp32():
    model, x = tiny_model(), images()
    with torch.no_grad():
        want = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


def bad(tmp_path, name, state_dict):
    torch.save(state_dict, tmp_path / name)
    with pytest.raises(CheckpointError) as err:
        load_clip(tmp_path / name)
    return str(err.value)


def test_bad_checkpoints_get_clear_errors(tmp_path):
    sd = tiny_model().state_dict()
    (tmp_path / "notes.pt").write_text("this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a readable checkpoint"):
        load_clip(tmp_path / "notes.pt")
    torch.save(sd, tmp_path / "whole.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: not a readable checkpoint"):
        load_clip(tmp_path / "truncated.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        load_clip(tmp_path / "absent.pt")

    msg = bad(tmp_path, "missing.pt", {k: v for k, v in sd.items() if k != "transformer.resblocks.1.ln_2.weight"})
    assert "missing.pt" in msg and "missing keys (1): transformer.resblocks.1.ln_2.weight" in msg
    msg = bad(tmp_path, "extra.pt", {**sd, "transformer.resblocks.0.attn.gate": torch.zeros(3)})
    assert "unexpected keys (1): transformer.resblocks.0.attn.gate" in msg
    msg = bad(tmp_path, "shape.pt", {**sd, "ln_post.weight": torch.ones(65)})
    assert "shapes differ (1): ln_post.weight: file (65,) vs model (64,)" in msg
    msg = bad(tmp_path, "resnet.pt", {"visual.layer1.0.conv1.weight": torch.zeros(4, 4, 1, 1)})
    assert "resnet.pt: no CLIP ViT image encoder" in msg
    msg = bad(tmp_path, "wrapped.pt", {"model": sd, "step": 3})
    assert "wrapped.pt: not a state dict of tensors" in msg


def test_an_asked_head_count_that_contradicts_config_json_is_refused(tmp_path, hf_clip):
    hf_clip(width=64, layers=2, heads=2, patch=8, image=32, proj=48).save_pretrained(tmp_path)
    assert load_clip(tmp_path).heads == load_clip(tmp_path, heads=2).heads == 2
    with pytest.raises(CheckpointError, match=r"trained with 2 attention heads \(.*config\.json says so\); 4 were"):
        load_clip(tmp_path, heads=4)


def test_a_file_loads_with_the_head_count_it_was_trained_with_and_no_other(tmp_path):
    """Without a record, a file follows OpenAI's rule; a .json beside it (pretrain.py's) overrides
    the rule; an asked count that contradicts either is refused, since it would load silently."""
    x = images()
    for width, heads in ((128, 2), (128, 4), (64, 2)):
        model = tiny_model(width=width, heads=heads)
        path = tmp_path / f"w{width}h{heads}.pt"
        torch.save(model.state_dict(), path)
        if heads != width // 64:
            with pytest.raises(CheckpointError, match=rf"trained with {width // 64} attention heads \(OpenAI's rule"):
                load_clip(path, heads=heads)
            path.with_suffix(".json").write_text(json.dumps({"heads": heads}))
        loaded = load_clip(path)
        assert loaded.heads == heads == load_clip(path, heads=heads).heads
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
        with pytest.raises(CheckpointError, match=rf"trained with {heads} attention heads .*; {heads + 1} were asked"):
            load_clip(path, heads=heads + 1)


def test_explicit_attention_is_torchs_attention_and_trains_like_it():
    """vit.Attention's bf16 CPU path against F.scaled_dot_product_attention: equal in fp32 (outputs
    and gradients), and in bf16 as close to the fp32 result as torch's fused kernel is."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 17, 8, requires_grad=True) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    got = explicit_attention(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g_want = torch.autograd.grad(want.square().sum(), (q, k, v))
    g_got = torch.autograd.grad(got.square().sum(), (q, k, v))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    halves = [t.detach().bfloat16() for t in (q, k, v)]
    half, fused = explicit_attention(*halves), torch.nn.functional.scaled_dot_product_attention(*halves)
    assert half.dtype == torch.bfloat16
    assert (half.float() - want).abs().max() <= 1.5 * (fused.float() - want).abs().max()


def test_explicit_attention_scales_q_without_changing_a_bf16_result_at_head_width_64():
    """Scaling Q by 1/8 (a power of two) before Q·Kᵀ rounds exactly as scaling the scores after it:
    at CLIP's head width 64 the bf16 output and gradients equal those of the scores-first form."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, 65, 64).bfloat16().requires_grad_() for _ in range(3))

    def scores_first(q, k, v):
        a = (q @ k.transpose(-1, -2)).float() * 64 ** -0.5
        return a.softmax(-1).to(v.dtype) @ v
    got, want = explicit_attention(q, k, v), scores_first(q, k, v)
    assert torch.equal(got, want)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        assert torch.equal(a, b)
