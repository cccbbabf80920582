"""A ViT-Tiny for 32x32 inputs (patch 4, 64 tokens + class token, width 192, depth 12, 3 heads).

Built from torchvision's ``MLPBlock``; attention is our own small module with ``nn.Linear``
projections because ``nn.MultiheadAttention`` (used by torchvision's ViT) calls its output
projection functionally: forward hooks on it never fire, so neither activation noise nor
activation quantization could see its input.

Example:
    >>> import torch
    >>> from dnq.models.vit import vit_tiny
    >>> model = vit_tiny(num_classes=10)
    >>> model.pos.shape, len(model.blocks), model.blocks[0].attn.heads  # 64 patch tokens + the class token
    (torch.Size([1, 65, 192]), 12, 3)
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.vision_transformer import MLPBlock


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.ln2, self.mlp = nn.LayerNorm(dim, eps=1e-6), MLPBlock(dim, mlp_dim, dropout)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, image_size=32, patch_size=4, in_channels=3, num_classes=10, dim=192, depth=12,
                 heads=3, mlp_dim=768, dropout=0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.patch = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        n = (image_size // patch_size) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim, dropout) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
        return self.head(self.ln(self.blocks(x))[:, 0])


def vit_tiny(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return ViT(image_size=image_size, patch_size=4 if image_size % 4 == 0 else 1, in_channels=in_channels,
               num_classes=num_classes)
