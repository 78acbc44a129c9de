"""CLIP's ViT image encoder, written from scratch, and checkpoint loading: the CLIP checkpoints
researchers have, and this project's own.

DFD-HR is built on the CLIP ViT-L/14 image encoder. This module holds that encoder
with the parameter names of OpenAI's checkpoint, so an OpenAI state dict loads with
`strict=True`, and `load_clip`, which reads every size off the tensors of:

  - OpenAI's released files: the TorchScript archive (`ViT-L-14.pt`, ...) or a plain state dict,
    full CLIP (the text tower is ignored) or image encoder only, with or without `visual.`;
  - Hugging Face CLIP checkpoints (`CLIPModel`, `CLIPVisionModel`,
    `CLIPVisionModelWithProjection`) as `.safetensors` or `.bin`, or the folder holding them.

The routed model (dfdhr.py) drives the encoder piece by piece: `embed`, then any block of
`blocks` on any subset of rows and tokens, then `project` (ln_post and CLIP's projection).
`read_checkpoint` and `load_weights` read train.py's checkpoints, names of earlier versions mapped.

Letters as in dfdhr.py's glossary: B batch, N tokens (1 CLS + grid² patches), D width, H heads of
D/H each, P projection width.
"""
import json
import math
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, as CLIP does, so bf16 autocast is safe."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """CLIP's activation, x * sigmoid(1.702 x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def explicit_attention(q, k, v):  # 3 x (B, H, N, D/H) -> (B, H, N, D/H), the softmax in fp32 as in the fused kernel
    a = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, H, N, N); scaling q is N/(D/H) times less work
    return a.softmax(-1, dtype=torch.float32).to(v.dtype) @ v


class Attention(nn.Module):
    """Multi-head self-attention with OpenAI's fused qkv names (`in_proj_weight`, `out_proj`).

    On the CPU in bf16 the attention runs as `explicit_attention`, faster there than torch's fused
    kernel (benchmarks/BENCHMARKS.md §6), at the price of (B, H, N, N) fp32 probabilities per
    layer; fp32 and GPUs take the fused kernel."""

    def __init__(self, *, width, heads):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by {heads} heads"
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def split_heads(self, x):  # (B, N, D) -> q, k, v, each (B, H, N, D/H)
        B, N, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3D)
        return qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)

    def merge_heads(self, y):  # (B, H, N, D/H) -> (B, N, D), through the output projection
        B, H, N, d = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, N, H * d))

    def forward(self, x):  # (B, N, D)
        q, k, v = self.split_heads(x)  # 3 x (B, H, N, D/H)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            y = explicit_attention(q, k, v)  # (B, H, N, D/H)
        else:
            y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D/H)
        return self.merge_heads(y)  # (B, N, D)


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, *, width, heads):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width=width, heads=heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))

    def forward(self, x):  # (B, N, D) -> (B, N, D), N may be any subset of tokens
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, *, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(Block(width=width, heads=heads) for _ in range(layers))


class VisionTransformer(nn.Module):
    """CLIP's image encoder. `output_dim=None` drops the projection (Hugging Face `CLIPVisionModel`)."""

    def __init__(self, *, image_size, patch_size, width, layers, heads, output_dim):
        super().__init__()
        assert image_size % patch_size == 0, f"image size {image_size} is not a multiple of patch {patch_size}"
        self.image_size, self.patch_size, self.width, self.heads = image_size, patch_size, width, heads
        self.output_dim = output_dim if output_dim is not None else width
        scale = width ** -0.5
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width=width, layers=layers, heads=heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim)) if output_dim is not None else None

    @property
    def blocks(self):
        return self.transformer.resblocks

    @property
    def num_tokens(self):
        return self.positional_embedding.shape[0]

    def embed(self, x):  # (B, 3, S, S) -> (B, N, D)
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {tuple(x.shape[-2:])}")
        x = self.conv1(x.to(self.conv1.weight.dtype))  # (B, D, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid², D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, N, D)
        return self.ln_pre(x)

    def project(self, cls):  # (B, D) -> (B, P): ln_post, then CLIP's projection
        x = self.ln_post(cls)
        return x @ self.proj if self.proj is not None else x

    def hidden_states(self, x):
        """Every layer's hidden states as a list: [after ln_pre, after block 1, ..., after block L]."""
        states = [self.embed(x)]
        for block in self.blocks:
            states.append(block(states[-1]))
        return states

    def tokens(self, x):  # (B, 3, S, S) -> (B, N, D), the last block's output
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x):  # (B, 3, S, S) -> (B, P), OpenAI's `encode_image`
        return self.project(self.tokens(x)[:, 0])


# ---------------------------------------------------------------------------------------------
# Checkpoint loading
# ---------------------------------------------------------------------------------------------

class CheckpointError(ValueError):
    """A file that is not a checkpoint, or whose tensors do not fit the model they are loaded into."""


# Hugging Face name -> OpenAI name. `{i}` is the block index. q/k/v are fused separately below.
HF_TO_OPENAI = {
    "vision_model.embeddings.class_embedding": "class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.pre_layrnorm.weight": "ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "ln_pre.bias",
    "vision_model.encoder.layers.{i}.layer_norm1.weight": "transformer.resblocks.{i}.ln_1.weight",
    "vision_model.encoder.layers.{i}.layer_norm1.bias": "transformer.resblocks.{i}.ln_1.bias",
    "vision_model.encoder.layers.{i}.self_attn.out_proj.weight": "transformer.resblocks.{i}.attn.out_proj.weight",
    "vision_model.encoder.layers.{i}.self_attn.out_proj.bias": "transformer.resblocks.{i}.attn.out_proj.bias",
    "vision_model.encoder.layers.{i}.layer_norm2.weight": "transformer.resblocks.{i}.ln_2.weight",
    "vision_model.encoder.layers.{i}.layer_norm2.bias": "transformer.resblocks.{i}.ln_2.bias",
    "vision_model.encoder.layers.{i}.mlp.fc1.weight": "transformer.resblocks.{i}.mlp.c_fc.weight",
    "vision_model.encoder.layers.{i}.mlp.fc1.bias": "transformer.resblocks.{i}.mlp.c_fc.bias",
    "vision_model.encoder.layers.{i}.mlp.fc2.weight": "transformer.resblocks.{i}.mlp.c_proj.weight",
    "vision_model.encoder.layers.{i}.mlp.fc2.bias": "transformer.resblocks.{i}.mlp.c_proj.bias",
    "vision_model.post_layernorm.weight": "ln_post.weight",
    "vision_model.post_layernorm.bias": "ln_post.bias",
}
HF_QKV = "vision_model.encoder.layers.{i}.self_attn.{qkv}_proj.{param}"  # fused into attn.in_proj_{param}
HF_IGNORED = ("text_model.", "text_projection.", "logit_scale", "vision_model.embeddings.position_ids")


def read_tensors(path):
    """Tensors of a checkpoint file, whatever its container: TorchScript, torch.save, safetensors."""
    try:
        if path.suffix == ".safetensors":
            return _read_safetensors(path)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                torchscript = any(n.endswith("constants.pkl") for n in archive.namelist())
            if torchscript:  # OpenAI's released files
                return torch.jit.load(str(path), map_location="cpu").state_dict()
        return torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # unpicklers fail in many ways on a file that is not theirs
        raise CheckpointError(f"{path}: not a readable checkpoint (TorchScript, torch.save or safetensors): {e}") from e


def _read_safetensors(path):  # Hugging Face's files; the package is needed for them only
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{path}: reading .safetensors files needs the safetensors package "
                              "(pip install safetensors)") from None
    return load_file(str(path))


def find_weights(path):
    """A Hugging Face model folder holds its weights in one of two files."""
    if not path.is_dir():
        return path
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return path / name
    raise CheckpointError(f"{path}: folder holds neither model.safetensors nor pytorch_model.bin")


def _from_hugging_face(sd, name):
    """Rename Hugging Face keys to OpenAI's, fuse q/k/v, transpose the projection."""
    layers = 1 + max((int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers.")), default=-1)
    out, used = {}, set()
    for hf, ours in HF_TO_OPENAI.items():
        for i in range(layers) if "{i}" in hf else [None]:
            key = hf.format(i=i)
            if key in sd:
                out[ours.format(i=i)] = sd[key]
                used.add(key)
    for i in range(layers):
        for param in ("weight", "bias"):
            keys = [HF_QKV.format(i=i, qkv=qkv, param=param) for qkv in "qkv"]
            if all(k in sd for k in keys):
                out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat([sd[k] for k in keys])
                used.update(keys)
    if "visual_projection.weight" in sd:
        out["proj"] = sd["visual_projection.weight"].t()  # Linear (out, D) -> OpenAI's (D, out)
        used.add("visual_projection.weight")
    class_embedding = sd.get("vision_model.embeddings.class_embedding")
    if class_embedding is not None and class_embedding.dim() != 1:
        raise CheckpointError(f"{name}: class_embedding has shape {tuple(class_embedding.shape)}, expected (width,)")
    leftover = [k for k in sd if k not in used and not k.startswith(HF_IGNORED)]
    out.update({f"<unmapped> {k}": sd[k] for k in leftover})  # reported as unexpected keys below
    return out


def _to_openai_layout(sd, name):
    """Image-encoder tensors with OpenAI's names, without the `visual.` prefix, in fp32."""
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{name}: not a state dict of tensors (got {type(sd).__name__})")
    if "embeddings.patch_embedding.weight" in sd:  # a CLIPVisionModel saved without its `vision_model.` prefix
        sd = {k if k.startswith("visual_projection.") else f"vision_model.{k}": v for k, v in sd.items()}
    if any(k.startswith("vision_model.") for k in sd):
        sd = _from_hugging_face(sd, name)
    elif any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}  # full CLIP: drop the text tower
    return {k: v.float() for k, v in sd.items()}


def load_clip(source, *, heads=None):
    """Build the right-sized `VisionTransformer` from a checkpoint path, folder or in-memory state dict.

    Sizes are read off the tensors. The number of heads cannot be: a file's comes from a Hugging
    Face `config.json` beside it, else from `{"heads": N}` in a .json of the file's name (which
    synthetic/pretrain.py writes), else from OpenAI's rule width // 64; `heads`, if given, must
    agree (a wrong count computes other attention without any error). An in-memory state dict
    takes `heads` as given.
    """
    is_file, stored, why = isinstance(source, (str, Path)), None, ""
    if is_file:
        path = find_weights(Path(source))
        name, config, sidecar = str(path), path.parent / "config.json", path.with_suffix(".json")
        if not path.exists():
            raise CheckpointError(f"{name}: no such file")
        if config.exists():
            cfg = json.loads(config.read_text())
            stored, why = cfg.get("vision_config", cfg).get("num_attention_heads"), f"{config} says so"
        elif sidecar.exists():  # this project's record beside its own weights (synthetic/pretrain.py)
            stored, why = json.loads(sidecar.read_text()).get("heads"), f"{sidecar} says so"
        sd = read_tensors(path)
    else:
        name, sd = "<state dict>", source
    sd = _to_openai_layout(sd, name)
    if "conv1.weight" not in sd or "positional_embedding" not in sd:
        raise CheckpointError(f"{name}: no CLIP ViT image encoder in it (no conv1.weight / positional_embedding); "
                              f"keys start with {sorted(sd)[:5]}")
    width, _, patch, _ = sd["conv1.weight"].shape
    if is_file:
        known = stored or max(1, width // 64)
        if not stored:
            why = f"OpenAI's rule width {width} // 64; a {sidecar.name} beside it with {{\"heads\": N}} records another"
        if heads is not None and heads != known:
            raise CheckpointError(f"{name} was trained with {known} attention heads ({why}); {heads} were asked for")
        heads = known
    grid = math.isqrt(sd["positional_embedding"].shape[0] - 1)
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    model = VisionTransformer(image_size=grid * patch, patch_size=patch, width=width, layers=layers,
                              heads=heads or max(1, width // 64),
                              output_dim=sd["proj"].shape[1] if "proj" in sd else None)
    problems = mismatch(model.state_dict(), sd)
    if problems:
        raise CheckpointError(f"{name} does not fit a CLIP ViT (width {width}, {layers} layers, patch {patch}, "
                              f"image {grid * patch}): {problems}")
    model.load_state_dict(sd, strict=True)
    return model


def mismatch(expected, sd, shown=5):
    """Why the state dict `sd` does not load strictly where `expected` is the model's: the number
    of missing and of unexpected keys with the first `shown` of each, and every shape that
    differs; "" when it loads."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in sd and sd[k].shape != v.shape]

    def listed(keys):
        return ", ".join(keys[:shown]) + (f" (+{len(keys) - shown} more)" if len(keys) > shown else "")
    return "; ".join(f"{what} ({len(keys)}): {listed(keys)}" for what, keys in
                     (("missing keys", missing), ("unexpected keys", unexpected), ("shapes differ", wrong)) if keys)


# ---------------------------------------------------------------------------------------------
# This project's checkpoints: train.py's last.pt and best.pt
# ---------------------------------------------------------------------------------------------

# Names that changed since checkpoints were written, earlier -> today's: regular expressions on the
# keys of the model's state dict, and fields of the model config. read_checkpoint applies both.
RENAMED_PARAMETERS = {
    r"^global_routers\.": "original_routers.",
    r"^local_routers\.": "split_routers.",
    r"\.experts\.(\d+)\.0\.": r".experts.\1.after_attn.",
    r"\.experts\.(\d+)\.1\.": r".experts.\1.after_mlp.",
}
RENAMED_SETTINGS = {"route_global": "route_original"}


def renamed(key):
    """A state dict key of an earlier version in today's name (RENAMED_PARAMETERS)."""
    for earlier, today in RENAMED_PARAMETERS.items():
        key = re.sub(earlier, today, key)
    return key


def read_checkpoint(path):
    """A checkpoint of this project, {model, optimizer, config, model_config, ...}, read without
    executing code (weights_only: tensors and plain data only), in today's names."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, a foreign one, or a pickle that would run code
        raise CheckpointError(f"{path}: not a readable checkpoint of this project (it is loaded with "
                              f"weights_only=True, which refuses anything but tensors and plain data): {e}") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "config"} <= ckpt.keys():
        raise CheckpointError(f"{path}: not a checkpoint of this project (no model, model_config and config inside)")
    ckpt["model"] = {renamed(k): v for k, v in ckpt["model"].items()}
    ckpt["model_config"] = {RENAMED_SETTINGS.get(k, k): v for k, v in ckpt["model_config"].items()}
    return ckpt


def load_weights(model, ckpt, name):
    """The weights of `ckpt` (read_checkpoint) into `model`, strictly. A checkpoint whose weights do
    not fit is refused with one CheckpointError: what differs (`mismatch`) and what the checkpoint
    says it was made with."""
    problems = mismatch(model.state_dict(), ckpt["model"])
    if problems:
        made = ", ".join(f"{k} {ckpt['config'].get(k)}" for k in ("method", "preset", "ablation"))
        raise CheckpointError(f"{name}: its weights do not fit the model its settings describe ({made}): {problems}")
    model.load_state_dict(ckpt["model"], strict=True)
