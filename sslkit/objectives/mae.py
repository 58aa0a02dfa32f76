"""MAE (He et al., 2022, "Masked Autoencoders Are Scalable Vision Learners", CVPR; arXiv:2111.06377).

Hide a random 75% of the image patches, run the ViT encoder on the visible 25% only, and let a light
transformer decoder reconstruct the pixels of the hidden patches from the encoded visible ones plus a
shared learnable mask token. The loss is the mean squared error on the masked patches only, against
per-patch normalised pixels (``norm_pix_loss``).

The class is split like the official ``models_mae.py``: :func:`patchify`, :func:`random_masking`,
:meth:`MAE.forward_encoder`, :meth:`MAE.forward_decoder`, :meth:`MAE.forward_loss`. Shape letters:
B batch, C channels, H/W image size, p patch size, L = (H/p)(W/p) patches, K visible patches,
D encoder width, Dd decoder width.

Example::

    enc = ENCODERS.build("vit_tiny_patch4_32", img_size=32, depth=4)
    mae = OBJECTIVES.build("mae", encoder=enc, cfg=MAEConfig(decoder_dim=128, decoder_depth=2, decoder_heads=4))
    out = mae([torch.randn(8, 3, 32, 32)])          # {"loss": scalar}
    out["loss"].backward()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from sslkit.encoders import Encoder
from sslkit.objectives.base import Objective, Views, global_rows, sample_seed
from sslkit.registry import OBJECTIVES, check_layers

# Wavelength scale of the sin-cos position embedding (Vaswani et al. 2017; the official MAE code uses the same).
SINCOS_TEMPERATURE = 10000.0
# LayerNorm epsilon of the decoder blocks and norm, as in timm's ViT and the official MAE.
LAYER_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------
# Position embedding
# ----------------------------------------------------------------------------------------------------------
def sincos_1d(dim: int, positions: torch.Tensor, temperature: float = SINCOS_TEMPERATURE) -> torch.Tensor:
    """1-D sin-cos embedding: (M,) positions -> (M, dim) = [sin(pos * w_k), cos(pos * w_k)], k < dim/2.

    ``w_k = temperature ** (-k / (dim / 2))``: wavelengths from 2*pi up to 2*pi*temperature.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2)  # (dim/2,)
    omega = temperature ** (-omega)  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (M, dim)


def sincos_2d(dim: int, grid: tuple[int, int], num_prefix: int = 1,
              temperature: float = SINCOS_TEMPERATURE) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding of a ``grid = (gh, gw)`` patch grid, row-major.

    The first ``dim/2`` channels encode the column (x), the last ``dim/2`` the row (y), each as
    ``[sin, cos]`` of :func:`sincos_1d` (the layout of the official MAE / MoCo v3 code). ``num_prefix``
    zero rows come first (the cls slot).

    Returns:
        (num_prefix + gh*gw, dim) float32. Row ``num_prefix + r*gw + c`` is patch (r, c); for
        ``k < dim/4`` and ``w_k = temperature ** (-k / (dim/4))``: column ``k`` is ``sin(c w_k)``,
        ``dim/4 + k`` is ``cos(c w_k)``, ``dim/2 + k`` is ``sin(r w_k)``, ``3 dim/4 + k`` is ``cos(r w_k)``.

    Example:
        >>> sincos_2d(64, (7, 7)).shape
        torch.Size([50, 64])
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {dim}")
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")  # (gh, gw) each
    emb_x = sincos_1d(dim // 2, cols.reshape(-1), temperature)  # (gh*gw, dim/2)
    emb_y = sincos_1d(dim // 2, rows.reshape(-1), temperature)  # (gh*gw, dim/2)
    emb = torch.cat([emb_x, emb_y], dim=1)  # (gh*gw, dim)
    return torch.cat([torch.zeros(num_prefix, dim, dtype=emb.dtype), emb], dim=0).float()  # (P+gh*gw, dim)


# ----------------------------------------------------------------------------------------------------------
# Patches and masking
# ----------------------------------------------------------------------------------------------------------
def _grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by the patch size {patch_size}; "
                         f"use an image size that is a multiple of {patch_size}")
    return height // patch_size, width // patch_size


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches row-major, each flattened as (p_row, p_col, channel).

    Example:
        >>> patchify(torch.randn(2, 3, 28, 28), 4).shape
        torch.Size([2, 49, 48])
    """
    B, C, H, W = imgs.shape
    p = patch_size
    gh, gw = _grid(H, W, p)
    x = imgs.reshape(B, C, gh, p, gw, p)  # (B, C, gh, p, gw, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return x.reshape(B, gh * gw, p * p * C)  # (B, L, p*p*C)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, p*p*C) -> (B, C, gh*p, gw*p). ``grid`` defaults to square.

    Example:
        >>> x = torch.randn(2, 1, 8, 12)
        >>> torch.equal(unpatchify(patchify(x, 4), 4, grid=(2, 3)), x)
        True
    """
    B, L, D = patches.shape
    p = patch_size
    if grid is None:
        side = math.isqrt(L)
        if side * side != L:
            raise ValueError(f"{L} patches do not form a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    gh, gw = grid
    if gh * gw != L or D % (p * p):
        raise ValueError(f"patches of shape {tuple(patches.shape)} do not fit grid {grid} with patch size {p}")
    C = D // (p * p)
    x = patches.reshape(B, gh, gw, p, p, C)  # (B, gh, gw, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
    return x.reshape(B, C, gh * p, gw * p)  # (B, C, H, W)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per image: ``round(L * (1 - mask_ratio))``; at least 1 visible and 1 masked."""
    k = round(num_patches * (1.0 - mask_ratio))
    if not 1 <= k <= num_patches - 1:
        raise ValueError(f"mask_ratio {mask_ratio} on {num_patches} patches leaves {k} visible; at least one "
                         "patch must be visible and one masked")
    return k


def random_masking(batch_size: int, num_patches: int, mask_ratio: float, device: torch.device | str | None = None,
                   noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by sorting uniform noise: ``noise`` (B, L) in [0, 1) if given (see
    :meth:`MAE.mask_noise`), else drawn from the global torch RNG of ``device``.

    Returns:
        ids_keep: (B, K) long, indices of the visible patches (in shuffled order), K = :func:`num_visible`.
        mask: (B, L) float, 1 = masked, 0 = visible, in the original patch order.
        ids_restore: (B, L) long, inverse of the shuffle: ``gather(shuffled, 1, ids_restore)`` is the
            original order.

    Example:
        >>> ids_keep, mask, ids_restore = random_masking(4, 49, 0.75)
        >>> ids_keep.shape, int(mask[0].sum())
        (torch.Size([4, 12]), 37)
    """
    B, L = batch_size, num_patches
    K = num_visible(L, mask_ratio)
    if noise is None:
        noise = torch.rand(B, L, device=device)  # (B, L) in [0, 1)
    elif noise.shape != (B, L):
        raise ValueError(f"masking noise of shape {tuple(noise.shape)} for {B} images of {L} patches")
    device = noise.device
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, L): ascending noise -> the first K are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L)
    ids_keep = ids_shuffle[:, :K]  # (B, K)
    mask = torch.ones(B, L, device=device)  # (B, L) in shuffled order
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (B, L) back in patch order
    return ids_keep, mask, ids_restore


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error.

    Args:
        pred, target: (B, L, P) predicted and true patch pixels.
        mask: (B, L), 1 where the patch was masked (counted), 0 where visible (ignored).
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()


def normalize_patches(patches: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch standardisation (norm_pix_loss): (B, L, P) -> (normalised, mean (B,L,1), std (B,L,1)).

    Uses the unbiased variance like the official code; ``std = sqrt(var + eps)``.
    """
    mean = patches.mean(dim=-1, keepdim=True)  # (B, L, 1)
    std = (patches.var(dim=-1, keepdim=True) + eps).sqrt()  # (B, L, 1)
    return (patches - mean) / std, mean, std


# ----------------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------------
class MAEDecoder(nn.Module):
    """Light transformer that fills in the masked patches.

    embed (D -> Dd) -> insert the mask token at masked positions -> + fixed 2-D sin-cos position
    embedding -> ``depth`` timm Blocks -> LayerNorm -> linear predictor to p*p*C pixels per patch.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, mlp_ratio: float, patch_size: int,
                 in_chans: int, grid: tuple[int, int], init_std: float) -> None:
        super().__init__()
        check_layers("objective.decoder_depth", depth)
        if dim % heads:
            raise ValueError(f"objective.decoder_dim {dim} must be divisible by objective.decoder_heads {heads}")
        if dim % 4:
            raise ValueError(f"objective.decoder_dim must be divisible by 4 (2-D sin-cos embedding), got {dim}")
        self.patch_size = patch_size
        self.grid = tuple(grid)
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed, not learned; a function of the grid, so it is recomputed rather than stored in checkpoints.
        self.register_buffer("pos_embed", sincos_2d(dim, self.grid)[None], persistent=False)  # (1, 1+L, Dd)
        norm = partial(nn.LayerNorm, eps=LAYER_NORM_EPS)
        self.blocks = nn.ModuleList(
            [Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * in_chans)
        self._init_weights(init_std)

    def _init_weights(self, init_std: float) -> None:
        nn.init.normal_(self.mask_token, std=init_std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, 1+L, Dd) for ``grid``: the buffer at the training grid, recomputed for other sizes."""
        if tuple(grid) == self.grid:
            return self.pos_embed
        return sincos_2d(self.pos_embed.shape[-1], grid)[None].to(self.pos_embed)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """latent (B, 1+K, D): cls + visible tokens in shuffled order -> pred (B, L, p*p*C)."""
        x = self.embed(latent)  # (B, 1+K, Dd)
        B, L = ids_restore.shape
        K = x.shape[1] - 1
        mask_tokens = self.mask_token.to(x.dtype).expand(B, L - K, -1)  # (B, L-K, Dd)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, Dd) in shuffled order
        index = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, L, Dd)
        x_ = torch.gather(x_, 1, index)  # (B, L, Dd) in patch order
        x = torch.cat([x[:, :1], x_], dim=1)  # (B, 1+L, Dd)
        x = x + self.position_embedding(grid)  # (B, 1+L, Dd)
        for blk in self.blocks:
            x = blk(x)  # (B, 1+L, Dd)
        x = self.norm(x)  # (B, 1+L, Dd)
        return self.pred(x)[:, 1:]  # (B, L, p*p*C), cls dropped


# ----------------------------------------------------------------------------------------------------------
# Objective
# ----------------------------------------------------------------------------------------------------------
@dataclass
class MAEConfig:
    name: str = "mae"
    # Fraction of patches hidden from the encoder. Paper (Fig. 5): 0.75 is best for both fine-tuning and
    # linear probing; fine-tuning is flat over about 0.4-0.8, linear probing falls steadily below 0.75.
    # Higher is also cheaper: the encoder cost scales with 1 - mask_ratio.
    mask_ratio: float = 0.75
    # Decoder width / depth / heads. Paper (Table 1a, b): 512 / 8 / 16. Fine-tuning barely cares (depth 1 is
    # within 0.1%), linear probing wants a deep, wide-enough decoder (8 blocks: +8% over 1). Small images:
    # 128 / 2 / 4 keeps the decoder cheaper than the encoder.
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    # Target = pixels standardised per patch (paper Table 1d: +0.5% fine-tuning). Turn off for
    # reconstructions that keep each patch's brightness/contrast (the predictor then learns them too).
    norm_pix_loss: bool = True
    norm_pix_eps: float = 1e-6  # added to the per-patch variance; raise it if flat patches make the loss spike
    # Official MAE: the encoder's position embedding is a FIXED 2-D sin-cos table, not learned.
    # False keeps the encoder's own (timm: learned) embedding.
    encoder_sincos_pos_embed: bool = True
    # Official MAE init of the encoder: xavier-uniform linear layers and patch projection, cls token N(0, init_std).
    # False keeps timm's truncated-normal init.
    encoder_mae_init: bool = True
    init_std: float = 0.02  # std of the normal init of the mask token (and, with encoder_mae_init, the cls token)


@OBJECTIVES.register("mae", config=MAEConfig,
                     help="MAE: reconstruct the pixels of 75% masked patches; encoder sees visible patches only")
class MAE(Objective):
    """Masked autoencoder objective (He et al. 2022) around a ViT :class:`Encoder`.

    ``forward([imgs])``: imgs (B, C, H, W), H and W multiples of the patch size -> ``{"loss": scalar}``.
    The eval encoder is the ViT itself, run on the whole image (pooling set by the encoder's ``pool``).
    """

    Config = MAEConfig
    views = Views(num_global=1)

    def __init__(self, encoder: Encoder, cfg: MAEConfig) -> None:
        super().__init__(encoder, cfg)
        if not encoder.is_vit:
            raise ValueError(f"objective 'mae' needs a ViT encoder (it drops masked tokens); got {encoder.name!r}")
        if not 0.0 < cfg.mask_ratio < 1.0:
            raise ValueError(f"objective.mask_ratio must be in (0, 1), got {cfg.mask_ratio}")
        if cfg.norm_pix_eps <= 0:
            raise ValueError(f"objective.norm_pix_eps must be > 0, got {cfg.norm_pix_eps}")
        self.patch_size: int = int(encoder.patch_size)  # type: ignore[arg-type]
        proj = encoder.model.patch_embed.proj
        self.in_chans: int = int(proj.in_channels)
        grid = tuple(int(g) for g in encoder.model.patch_embed.grid_size)
        self.decoder = MAEDecoder(encoder.dim, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads,
                                  cfg.decoder_mlp_ratio, self.patch_size, self.in_chans, grid, cfg.init_std)
        if cfg.encoder_mae_init:
            self._mae_init_encoder(cfg.init_std)
        if cfg.encoder_sincos_pos_embed:
            self._fix_encoder_pos_embed(grid)

    # -- encoder set-up, as in the official code -----------------------------------------------------------
    @torch.no_grad()
    def _mae_init_encoder(self, init_std: float) -> None:
        m = self.encoder.model
        w = m.patch_embed.proj.weight  # (D, C, p, p): init like a linear layer on the flattened patch
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for tok in ("cls_token", "reg_token"):
            if getattr(m, tok, None) is not None:
                nn.init.normal_(getattr(m, tok), std=init_std)
        for mod in m.blocks.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)

    @torch.no_grad()
    def _fix_encoder_pos_embed(self, grid: tuple[int, int]) -> None:
        pe = self.encoder.model.pos_embed  # (1, [P +] L, D)
        prefix = pe.shape[1] - grid[0] * grid[1]
        pe.copy_(sincos_2d(pe.shape[-1], grid, num_prefix=prefix)[None])
        pe.requires_grad_(False)

    # -- the model, step by step ---------------------------------------------------------------------------
    def grid_of(self, imgs: torch.Tensor) -> tuple[int, int]:
        """(gh, gw) patch grid of a (B, C, H, W) batch; raises if H or W is not a multiple of p."""
        return _grid(imgs.shape[-2], imgs.shape[-1], self.patch_size)

    def mask_noise(self, batch_size: int, num_patches: int, step: int, device: torch.device) -> torch.Tensor:
        """The training step's masking noise (B, L) for this rank's images: rows of one (world B, L) draw seeded by
        (seed, step), so an image is masked alike however the batch is split over processes, and a resumed run
        draws what the original did. The draw is on ``device`` and costs world x B x L numbers."""
        offset, total = global_rows(batch_size)
        g = torch.Generator(device).manual_seed(sample_seed(self.seed, step))
        return torch.rand(total, num_patches, generator=g, device=device)[offset:offset + batch_size]  # (B, L)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs (B, C, H, W) -> latent (B, 1+K, D) (cls + visible), mask (B, L), ids_restore (B, L).

        ``noise`` (B, L) decides the masks (:func:`random_masking`); None draws it from the global RNG.
        """
        gh, gw = self.grid_of(imgs)
        ids_keep, mask, ids_restore = random_masking(imgs.shape[0], gh * gw, mask_ratio, imgs.device, noise)
        cls, _, visible = self.encoder.forward_tokens(imgs, keep=ids_keep)  # (B, D), registers, (B, K, D)
        latent = torch.cat([cls.unsqueeze(1), visible], dim=1)  # (B, 1+K, D)
        return latent, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                        grid: tuple[int, int]) -> torch.Tensor:
        """latent (B, 1+K, D), ids_restore (B, L) -> predicted patches (B, L, p*p*C)."""
        return self.decoder(latent, ids_restore, grid)

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """The regression target (B, L, p*p*C): patch pixels, standardised per patch if norm_pix_loss."""
        target = patchify(imgs.float(), self.patch_size)  # (B, L, p*p*C)
        if self.cfg.norm_pix_loss:
            target = normalize_patches(target, self.cfg.norm_pix_eps)[0]
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs (B, C, H, W), pred (B, L, p*p*C), mask (B, L) -> scalar MSE over masked patches (float32)."""
        return masked_mse(pred, self.target(imgs), mask)

    def forward(self, views: list[torch.Tensor], step: int = 0) -> dict[str, torch.Tensor]:
        if len(views) != 1:
            raise ValueError(f"objective 'mae' takes one view per image, got {len(views)}; use augment.name=mae")
        imgs = views[0]  # (B, C, H, W)
        gh, gw = self.grid_of(imgs)
        noise = self.mask_noise(imgs.shape[0], gh * gw, step, imgs.device)  # (B, L)
        latent, mask, ids_restore = self.forward_encoder(imgs, self.cfg.mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore, self.grid_of(imgs))  # (B, L, p*p*C)
        return {"loss": self.forward_loss(imgs, pred, mask)}

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, mask_ratio: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted images in the input's (normalised) pixel space, for pictures.

        With norm_pix_loss the prediction is per-patch standardised; it is mapped back with each patch's
        own mean and std from ``imgs`` (as the official visualisation does), so visible-patch statistics
        are exact and the masked patches show what the decoder predicts around their true mean/contrast.

        Returns:
            recon (B, C, H, W) and mask (B, L) (1 = masked).
        """
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        grid = self.grid_of(imgs)
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio)
        pred = self.forward_decoder(latent, ids_restore, grid).float()  # (B, L, p*p*C)
        if self.cfg.norm_pix_loss:
            _, mean, std = normalize_patches(patchify(imgs.float(), self.patch_size), self.cfg.norm_pix_eps)
            pred = pred * std + mean  # (B, L, p*p*C)
        return unpatchify(pred, self.patch_size, grid), mask

    def pixel_mask(self, mask: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
        """A patch mask (B, L) from :meth:`reconstruct` as pixels: (B, 1, H, W), 1 where the patch was hidden."""
        p, c = self.patch_size, imgs.shape[1]
        return unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * c).float(), p, self.grid_of(imgs))[:, :1]

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"decoder.mask_token"}
