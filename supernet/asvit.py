"""`AsViT`: the static four-stage hierarchical ViT of As-ViT (Chen et al., ICLR 2022; seed 001).

Architecture dict (hierarchical; `supernet.asvit_space` validates it against a space):

    {"embed_dim": C, "num_heads": H,
     "stages": [{"kernel": K_i, "split": S_i, "expansion": E_i, "depth": L_i}, x 4]}

Stage i (0-based) has width W_i = min(width_cap, C * 2^i) (As-ViT's code caps at 1024), H / 2^(3-i)
heads of head_dim W_i // heads (attention width heads * head_dim, As-ViT's code truncates when the
count does not divide the width), L_i pre-norm blocks of window attention and an MLP of hidden
width E_i * W_i. Stage 0 tokenizes with a K_1 x K_1 convolution of stride 4 (overlapping when
K_1 > 4) and a LayerNorm; stages 1-3 re-embed with a K_i x K_i window of stride 2: the window's
tokens are concatenated (unfold), LayerNorm-ed and projected by a bias-free linear layer to
W_i. All paddings are TensorFlow's "SAME" (grid = ceil(size / stride)), so any image size works.
Attention runs inside S_i x S_i windows per stage (S_i splits per side; rows and columns cut as
`torch.tensor_split` does when S_i does not divide the grid; at most one token per window); no
shifted windows, no position embedding. The head: final LayerNorm on every token, mean pool,
As-ViT's code's pre-logits layer (linear + tanh; optional) and the linear classifier. `docs/ASVIT.md` records each choice and where it comes from.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from vitas.supernet.layers import attend, merge_heads, split_heads
from vitas.supernet.static import init_vit_weights

STAGES = 4
STEM_STRIDE = 4  # stage 0 runs at 1/4 of the image resolution
MERGE_STRIDE = 2  # every later stage halves the grid
WIDTH_CAP = 1024  # As-ViT's code: no stage is wider than 1024 channels
STAGE_KEYS = ("kernel", "split", "expansion", "depth")
LN_EPS = 1e-5  # As-ViT's code uses PyTorch's default LayerNorm


# ----------------------------------------------------------------------------- arithmetic
def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one axis: the output has ceil(size / stride)
    positions and the dilated kernel's extra span is split evenly, the odd pixel after."""
    span = dilation * (kernel - 1) + 1
    total = max((-(-size // stride) - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def stage_grids(img_size: int, stem_stride: int = STEM_STRIDE) -> list[int]:
    """Tokens per side of the four stages for a square `img_size` image (SAME padding)."""
    grids = [-(-img_size // stem_stride)]
    for _ in range(STAGES - 1):
        grids.append(-(-grids[-1] // MERGE_STRIDE))
    return grids


def window_sizes(grid: int, splits: int) -> list[int]:
    """Sizes of the `splits` windows along one axis of `grid` tokens (as `torch.tensor_split`: the
    first grid % splits windows one token longer); at most `grid` windows."""
    n = min(splits, grid)
    q, r = divmod(grid, n)
    return [q + 1] * r + [q] * (n - r)


def stage_widths(embed_dim: int, width_cap: Optional[int] = WIDTH_CAP) -> list[int]:
    """Channel width of each stage: doubling from `embed_dim`, capped at `width_cap` (None: no cap)."""
    return [min(embed_dim * 2**i, width_cap) if width_cap else embed_dim * 2**i for i in range(STAGES)]


def stage_heads(num_heads: int) -> list[int]:
    """Heads of each stage: the last stage has `num_heads`, each earlier one half as many."""
    return [num_heads // 2 ** (STAGES - 1 - i) for i in range(STAGES)]


def check_asvit_arch(arch: dict, width_cap: Optional[int] = WIDTH_CAP) -> dict:
    """A plain-int copy of a hierarchical architecture whose fields are consistent on their own
    (no space needed): ValueError naming the field otherwise."""
    if not isinstance(arch, dict) or not isinstance(arch.get("stages"), list) or not {
            "embed_dim", "num_heads"} <= set(arch):
        raise ValueError("an As-ViT architecture is a dict with 'embed_dim', 'num_heads' and 'stages'")
    if len(arch["stages"]) != STAGES:
        raise ValueError(f"architecture field 'stages' has {len(arch['stages'])} entries, As-ViT has {STAGES}")
    out = {"embed_dim": int(arch["embed_dim"]), "num_heads": int(arch["num_heads"]), "stages": []}
    for i, stage in enumerate(arch["stages"]):
        if not isinstance(stage, dict) or not set(STAGE_KEYS) <= set(stage):
            raise ValueError(f"architecture field 'stages[{i}]' needs the fields {list(STAGE_KEYS)}")
        out["stages"].append({k: int(stage[k]) for k in STAGE_KEYS})
        for k in STAGE_KEYS:
            if out["stages"][i][k] < 1:
                raise ValueError(f"architecture field 'stages[{i}].{k}' must be >= 1, got {stage[k]}")
    if out["num_heads"] % 2 ** (STAGES - 1):
        raise ValueError(f"architecture field 'num_heads' must be a multiple of {2 ** (STAGES - 1)} "
                         f"(stage 1 has num_heads / 8 heads), got {out['num_heads']}")
    for i, (w, h) in enumerate(zip(stage_widths(out["embed_dim"], width_cap), stage_heads(out["num_heads"]))):
        if w < h:
            raise ValueError(f"architecture stage {i + 1}: width {w} is narrower than its {h} heads "
                             f"(embed_dim {out['embed_dim']}, num_heads {out['num_heads']})")
    return out


# ----------------------------------------------------------------------------- windows
def _regions(sizes: list[int]) -> list[tuple[int, int, int]]:
    """(start, window size, window count) of the runs of equal windows along one axis."""
    out, start = [], 0
    for size in sorted(set(sizes), reverse=True):
        count = sizes.count(size)
        out.append((start, size, count))
        start += size * count
    return out


def windowed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, splits: int) -> torch.Tensor:
    """Apply `fn` to the tokens of each of `splits` x `splits` windows of a (B, H, W, D) grid.

    `fn` maps (windows, tokens, D) to (windows, tokens, D'); windows of equal shape go through it
    in one batch (at most four shapes when `splits` does not divide the grid)."""
    B, H, W, _ = x.shape
    rows = []
    for r0, wh, nh in _regions(window_sizes(H, splits)):
        cols = []
        for c0, ww, nw in _regions(window_sizes(W, splits)):
            part = x[:, r0:r0 + wh * nh, c0:c0 + ww * nw]
            part = part.reshape(B, nh, wh, nw, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, wh * ww, -1)
            out = fn(part)
            out = out.reshape(B, nh, nw, wh, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, nh * wh, nw * ww, -1)
            cols.append(out)
        rows.append(torch.cat(cols, dim=2) if len(cols) > 1 else cols[0])
    return torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]


# ----------------------------------------------------------------------------- layers
class WindowAttention(nn.Module):
    """Multi-head self-attention inside `splits` x `splits` local windows of a (B, H, W, C) grid."""

    def __init__(self, dim: int, num_heads: int, splits: int, qkv_bias: bool):
        super().__init__()
        head_dim = dim // num_heads
        self.num_heads, self.splits, self.scale = num_heads, splits, head_dim ** -0.5
        self.explicit = False
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def _attend(self, tokens: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(tokens, self.num_heads)
        return merge_heads(attend(q, k, v, self.scale, explicit=self.explicit))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(windowed(self._attend, self.qkv(x), self.splits))


class Mlp(nn.Module):
    """fc1, GELU, fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: window attention and MLP, each residual with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, splits: int, expansion: int, qkv_bias: bool,
                 drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = WindowAttention(dim, num_heads, splits, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, expansion * dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stem(nn.Module):
    """Tokenization: a `kernel` x `kernel` conv of stride 4 with SAME padding, then a LayerNorm.

    Progressive re-tokenization changes `proj.stride` and `proj.dilation` (`set_tokenization`);
    the weights keep their shape."""

    def __init__(self, in_chans: int, dim: int, kernel: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride=STEM_STRIDE)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (k, _), (s, _), (d, _) = self.proj.kernel_size, self.proj.stride, self.proj.dilation
        x = F.pad(x, same_padding(x.shape[3], k, s, d) + same_padding(x.shape[2], k, s, d))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class Reembed(nn.Module):
    """Re-embedding between stages: each `kernel` x `kernel` window of stride 2 (SAME padding)
    concatenated, LayerNorm-ed and projected to `out_dim` by a bias-free linear layer."""

    def __init__(self, dim: int, out_dim: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.norm = nn.LayerNorm(kernel * kernel * dim, eps=LN_EPS)
        self.reduction = nn.Linear(kernel * kernel * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        k = self.kernel
        x = F.pad(x.permute(0, 3, 1, 2), same_padding(W, k, MERGE_STRIDE) + same_padding(H, k, MERGE_STRIDE))
        cols = F.unfold(x, k, stride=MERGE_STRIDE)  # (B, C*k*k, positions)
        cols = cols.transpose(1, 2).reshape(B, -(-H // MERGE_STRIDE), -(-W // MERGE_STRIDE), C * k * k)
        return self.reduction(self.norm(cols))


class ClassifierHead(nn.Module):
    """The classifier on the pooled feature: As-ViT's code puts a `pre_logits` linear layer with
    tanh (the representation layer of Dosovitskiy et al.) before the final `fc`; optional."""

    def __init__(self, dim: int, num_classes: int, pre_logits: bool):
        super().__init__()
        self.pre_logits = nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) if pre_logits else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pre_logits(x))


class Stage(nn.Module):
    """One resolution: optional re-embedding, then `depth` blocks."""

    def __init__(self, downsample: Optional[nn.Module], blocks: Sequence[nn.Module]):
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


# ----------------------------------------------------------------------------- the model
class AsViT(nn.Module):
    """As-ViT for one hierarchical architecture dict (see the module docstring).

    `forward_tokens` gives the last stage's tokens (B, N, C4) before the final norm;
    `forward_features` their mean (the pooled feature before the final norm that As-ViT's proxies
    read); `forward` = head(mean(norm(tokens))). `explicit_attention` writes attention out
    instead of fused SDPA (forward-mode AD).
    """

    def __init__(
        self,
        arch: dict,
        num_classes: int = 1000,
        img_size: Union[int, Sequence[int]] = 224,
        in_chans: int = 3,
        qkv_bias: bool = True,
        width_cap: Optional[int] = WIDTH_CAP,
        pre_logits: bool = True,
        drop_path: float = 0.0,
        explicit_attention: bool = False,
    ):
        super().__init__()
        arch = check_asvit_arch(arch, width_cap)
        if not isinstance(img_size, int):
            h, w = img_size
            if h != w:
                raise ValueError(f"AsViT needs a square image size, got {tuple(img_size)}")
            img_size = int(h)
        self.arch = arch
        self.model_args = dict(arch=arch, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                               qkv_bias=qkv_bias, width_cap=width_cap, pre_logits=pre_logits)
        self.num_classes, self.in_chans = num_classes, in_chans
        widths, heads = stage_widths(arch["embed_dim"], width_cap), stage_heads(arch["num_heads"])
        self.num_features = widths[-1]
        depth = sum(s["depth"] for s in arch["stages"])
        rates = iter([drop_path * i / max(depth - 1, 1) for i in range(depth)])
        self.stem = Stem(in_chans, widths[0], arch["stages"][0]["kernel"])
        self.stages = nn.ModuleList()
        for i, s in enumerate(arch["stages"]):
            down = Reembed(widths[i - 1], widths[i], s["kernel"]) if i else None
            blocks = [Block(widths[i], heads[i], s["split"], s["expansion"], qkv_bias, next(rates))
                      for _ in range(s["depth"])]
            self.stages.append(Stage(down, blocks))
        self.norm = nn.LayerNorm(widths[-1], eps=LN_EPS)
        self.head = ClassifierHead(widths[-1], num_classes, pre_logits)
        self.explicit_attention = explicit_attention
        init_vit_weights(self)

    @property
    def explicit_attention(self) -> bool:
        """Whether attention is written out (True) or runs through fused SDPA (False)."""
        return all(m.explicit for m in self.modules() if isinstance(m, WindowAttention))

    @explicit_attention.setter
    def explicit_attention(self, value: bool) -> None:
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.explicit = bool(value)

    def set_tokenization(self, stride: int, dilation: int) -> None:
        """Stride and dilation of the tokenizing conv (progressive re-tokenization); weights kept."""
        self.stem.proj.stride = (int(stride), int(stride))
        self.stem.proj.dilation = (int(dilation), int(dilation))

    def no_weight_decay(self) -> set[str]:
        """Nothing is exempt beyond timm's 1-D rule (no tokens or position tables)."""
        return set()

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's tokens before the final norm, (B, N, C4)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x.flatten(1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the last stage's tokens before the final norm, (B, C4)."""
        return self.forward_tokens(x).mean(dim=1)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm on every token, mean pool, classify."""
        return self.head(self.norm(tokens).mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_tokens(x))


def is_asvit_arch(arch: object) -> bool:
    """Whether an architecture dict is hierarchical (As-ViT) rather than a flat ViT's."""
    return isinstance(arch, dict) and "stages" in arch


default_cfgs = generate_default_cfgs({
    "vitas_asvit": {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.proj", "classifier": "head.fc",
    },
})


@register_model
def vitas_asvit(pretrained: bool = False, **kwargs) -> AsViT:
    """timm entry point of `AsViT` (kwargs are its constructor arguments, `arch` included)."""
    return build_model_with_cfg(AsViT, "vitas_asvit", pretrained, **kwargs)
