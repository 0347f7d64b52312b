"""GeneralizedAttention: the spatial attention block GRoIE runs after the level aggregation.

The block of Zhu et al., "An Empirical Study of Spatial Attention Mechanisms in Deep Networks" (ICCV 2019),
with the maths, parameter names and state_dict keys of mmcv's ``GeneralizedAttention``, so checkpoints move
between the two with ``load_state_dict(strict=True)``.

For a query pixel q and a key pixel k of head m, the energy is the sum of the terms that ``attention_type``
switches on (a string of four bits):

    bit 0  '1000'  query content . key content          (q_m . k_m)
    bit 1  '0100'  query content . relative position    (q_m . (r_x + r_y))
    bit 2  '0010'  key content only                     (u_m . k_m)         u = ``appr_bias``
    bit 3  '0001'  relative position only               (v_m . (r_x + r_y)) v = ``geom_bias``

where r_x, r_y are linear maps (``appr_geom_fc_x``/``_y``) of sinusoidal embeddings of the column and row
offsets between query and key, divided by sqrt(2). As in mmcv, when bit 1 is set without bit 3 the row term
of query (y, x) uses the query content of pixel (x, y) (a transposition in mmcv's code that its checkpoints
carry), so those types need a square query grid, as RoI features are. Keys and values come from the input
subsampled by ``kv_stride``, queries from the input subsampled by ``q_stride`` (the output is upsampled back
bilinearly); as in mmcv, the subsampling is done by the ``kv_downsample`` / ``q_downsample`` modules (a 1x1
``AvgPool2d`` with that stride, None at stride 1), which hold no state.
The attended values go through ``proj_conv`` and are added to the input scaled by ``gamma``, which starts at
zero so a freshly built block is the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GeneralizedAttention"]

# mmcv sizes its stored local-constraint map for the feature sizes of a ResNet stage: 84 for 256 channels,
# 42 for 512. The map is kept (same shape and content) only so that state_dicts interchange.
_MMCV_LOCAL_MAP_SIZE = {256: 84, 512: 42}


def _local_window(num_q: int, num_kv: int, spatial_range: int, kv_stride: int, device) -> torch.Tensor:
    """[num_q, num_kv] bool, True where key row (or column) j is inside the window of query row i.

    The window of query i is floor((i - r) / s) <= j <= floor((i + r + 1) / s): the window of mmcv's
    local-constraint map, for any size.
    """
    q = torch.arange(num_q, device=device)
    kv = torch.arange(num_kv, device=device)
    low = torch.div(q - spatial_range, kv_stride, rounding_mode="floor")
    high = torch.div(q + spatial_range + 1, kv_stride, rounding_mode="floor")
    return (kv[None, :] >= low[:, None]) & (kv[None, :] <= high[:, None])


class GeneralizedAttention(nn.Module):
    """Generalized spatial attention over a feature map (mmcv-compatible).

    Args:
        in_channels: channels C of the input.
        spatial_range: keys further than this (in query pixels, mapped onto the key grid) are masked out;
            -1 means no constraint.
        num_heads: attention heads; each head has ``in_channels // num_heads`` query/key/value channels.
        position_embedding_dim: size of the sinusoidal offset embedding (half for x, half for y);
            -1 means ``in_channels``. Must be a multiple of 4 when bit 1 or 3 of ``attention_type`` is set.
        position_magnitude: multiplier on the pixel offsets before embedding.
        kv_stride: subsampling stride of the key/value grid.
        q_stride: subsampling stride of the query grid.
        attention_type: four '0'/'1' characters, see the module docstring.

    Input [N, C, H, W] of any float dtype; output the same shape and dtype.

    Raises:
        ValueError: ``attention_type`` is not four binary digits, ``num_heads`` is not positive or larger
            than ``in_channels``, a stride is not positive, or the position embedding size is not a
            multiple of 4 where it is used.
    """

    def __init__(
        self,
        in_channels: int,
        spatial_range: int = -1,
        num_heads: int = 9,
        position_embedding_dim: int = -1,
        position_magnitude: int = 1,
        kv_stride: int = 2,
        q_stride: int = 1,
        attention_type: str = "1111",
    ) -> None:
        super().__init__()
        if not (isinstance(attention_type, str) and len(attention_type) == 4
                and set(attention_type) <= {"0", "1"}):
            raise ValueError(f"attention_type must be four '0'/'1' characters, got {attention_type!r}")
        if num_heads <= 0 or in_channels < num_heads:
            raise ValueError(
                f"num_heads must be in [1, in_channels={in_channels}], got num_heads={num_heads}"
            )
        if kv_stride <= 0 or q_stride <= 0:
            raise ValueError(f"kv_stride and q_stride must be positive, got {kv_stride} and {q_stride}")

        self.in_channels = in_channels
        self.spatial_range = spatial_range
        self.num_heads = num_heads
        self.position_embedding_dim = position_embedding_dim if position_embedding_dim > 0 else in_channels
        self.position_magnitude = position_magnitude
        self.kv_stride = kv_stride
        self.q_stride = q_stride
        self.attention_type = [c == "1" for c in attention_type]
        self.qk_embed_dim = in_channels // num_heads
        self.v_dim = in_channels // num_heads
        content_q, position_q, content_k, position_k = self.attention_type
        qk_channels = self.qk_embed_dim * num_heads

        if (position_q or position_k) and self.position_embedding_dim % 4 != 0:
            raise ValueError(
                "position_embedding_dim (in_channels when -1) must be a multiple of 4 when attention_type "
                f"uses relative positions, got {self.position_embedding_dim}"
            )

        if content_q or position_q:
            self.query_conv = nn.Conv2d(in_channels, qk_channels, kernel_size=1, bias=False)
        if content_q or content_k:
            self.key_conv = nn.Conv2d(in_channels, qk_channels, kernel_size=1, bias=False)
        self.value_conv = nn.Conv2d(in_channels, self.v_dim * num_heads, kernel_size=1, bias=False)
        if position_q or position_k:
            self.appr_geom_fc_x = nn.Linear(self.position_embedding_dim // 2, qk_channels, bias=False)
            self.appr_geom_fc_y = nn.Linear(self.position_embedding_dim // 2, qk_channels, bias=False)
        bias_bound = 1.0 / math.sqrt(self.qk_embed_dim * 2)
        if content_k:
            self.appr_bias = nn.Parameter(torch.empty(qk_channels).uniform_(-bias_bound, bias_bound))
        if position_k:
            self.geom_bias = nn.Parameter(torch.empty(qk_channels).uniform_(-bias_bound, bias_bound))
        self.proj_conv = nn.Conv2d(self.v_dim * num_heads, in_channels, kernel_size=1, bias=True)
        self.gamma = nn.Parameter(torch.zeros(1))
        # mmcv's subsampling modules (no state): a 1x1 average with stride s takes every s-th pixel, the
        # same values as slicing [::s, ::s]; None at stride 1, as in mmcv.
        self.q_downsample = nn.AvgPool2d(kernel_size=1, stride=q_stride) if q_stride > 1 else None
        self.kv_downsample = nn.AvgPool2d(kernel_size=1, stride=kv_stride) if kv_stride > 1 else None

        if spatial_range >= 0 and in_channels in _MMCV_LOCAL_MAP_SIZE:
            size = _MMCV_LOCAL_MAP_SIZE[in_channels]
            size_kv = int((size - 1.0) / kv_stride + 1)
            window = _local_window(size, size_kv, spatial_range, kv_stride, "cpu")
            outside = ~(window[:, None, :, None] & window[None, :, None, :])
            # Not read by forward (which builds the mask for any size); mmcv checkpoints carry it.
            self.register_buffer("local_constraint_map", outside.to(torch.uint8))

        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv's initialisation: Kaiming-uniform (a=1, fan_in) projections, zero biases, gamma = 0."""
        names = ("query_conv", "key_conv", "value_conv", "appr_geom_fc_x", "appr_geom_fc_y", "proj_conv")
        for layer in (getattr(self, name) for name in names if hasattr(self, name)):
            nn.init.kaiming_uniform_(layer.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.gamma)

    def extra_repr(self) -> str:
        bits = "".join("1" if b else "0" for b in self.attention_type)
        return (
            f"in_channels={self.in_channels}, num_heads={self.num_heads}, attention_type='{bits}', "
            f"spatial_range={self.spatial_range}, kv_stride={self.kv_stride}, q_stride={self.q_stride}"
        )

    def _offset_embedding(self, num_q: int, num_kv: int, ref: torch.Tensor) -> torch.Tensor:
        """[num_q, num_kv, position_embedding_dim // 2] sin/cos embedding of the pixel offsets."""
        q_pos = torch.arange(num_q, device=ref.device, dtype=ref.dtype) * self.q_stride
        kv_pos = torch.arange(num_kv, device=ref.device, dtype=ref.dtype) * self.kv_stride
        offset = (q_pos[:, None, None] - kv_pos[None, :, None]) * self.position_magnitude
        dim = self.position_embedding_dim
        freq_index = torch.arange(dim // 4, device=ref.device, dtype=ref.dtype)
        wave = torch.tensor(1000.0, device=ref.device, dtype=ref.dtype) ** ((4.0 / dim) * freq_index)
        phase = offset / wave
        return torch.cat((phase.sin(), phase.cos()), dim=2)

    def _position_features(self, fc: nn.Linear, num_q: int, num_kv: int, ref: torch.Tensor) -> torch.Tensor:
        """[heads, num_q, num_kv, d]: one axis of the relative-position features (already / sqrt(2))."""
        feat = fc(self._offset_embedding(num_q, num_kv, ref))
        feat = feat.view(num_q, num_kv, self.num_heads, self.qk_embed_dim).permute(2, 0, 1, 3)
        return feat / math.sqrt(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] -> x + gamma * attention(x), same shape and dtype."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"GeneralizedAttention expects [N, {self.in_channels}, H, W] input, got {tuple(x.shape)}"
            )
        content_q, position_q, content_k, position_k = self.attention_type
        heads, d = self.num_heads, self.qk_embed_dim
        x_q = x if self.q_downsample is None else self.q_downsample(x)
        x_kv = x if self.kv_downsample is None else self.kv_downsample(x)
        n, _, h, w = x_q.shape
        h_kv, w_kv = x_kv.shape[2:]

        # Key content alone gives every query the same energies: mmcv computes them once, as a 1x1 query
        # grid (its local mask is then the one of query (0, 0)).
        saliency_only = content_k and not (content_q or position_q or position_k)
        if saliency_only:
            h = w = 1

        energy = x.new_zeros(n, heads, h, w, h_kv, w_kv)
        if content_q or position_q:
            query = self.query_conv(x_q).reshape(n, heads, d, h, w).permute(0, 1, 3, 4, 2)
        if content_q or content_k:
            key = self.key_conv(x_kv).reshape(n, heads, d, h_kv * w_kv)
            if content_q:
                content = query + self.appr_bias.view(1, heads, 1, 1, d) if content_k else query
                term = torch.matmul(content.reshape(n, heads, h * w, d), key).view(n, heads, h, w, h_kv, w_kv)
            else:
                term = torch.matmul(self.appr_bias.view(1, heads, 1, d), key).view(n, heads, 1, 1, h_kv, w_kv)
            energy = energy + term
        if position_q or position_k:
            if position_q:
                geom = query + self.geom_bias.view(1, heads, 1, 1, d) if position_k else query
            else:
                geom = self.geom_bias.view(1, heads, 1, 1, d)
            feat_x = self._position_features(self.appr_geom_fc_x, w, w_kv, x)
            feat_y = self._position_features(self.appr_geom_fc_y, h, h_kv, x)
            energy_x = torch.einsum("nmyxd,mxkd->nmyxk", geom, feat_x)
            if position_q and not position_k:
                # mmcv's branch for bit 1 without bit 3 multiplies the row features with the query grid
                # transposed (query (x, y) where (y, x) is meant). Every mmcv-trained checkpoint of this
                # type, GRoIE's '0100' included, learnt with it, so it is kept; it needs a square grid.
                if h != w:
                    raise ValueError(
                        "GeneralizedAttention with bit 1 ('0100') and without bit 3 needs a square query "
                        f"grid, as mmcv's does; got {h}x{w} (input {tuple(x.shape[2:])}, q_stride "
                        f"{self.q_stride})"
                    )
                geom = geom.transpose(2, 3)
            energy_y = torch.einsum("nmyxd,myjd->nmyxj", geom, feat_y)
            energy = energy + (energy_x[..., None, :] + energy_y[..., :, None])

        if self.spatial_range >= 0:
            rows = _local_window(h, h_kv, self.spatial_range, self.kv_stride, x.device)
            cols = _local_window(w, w_kv, self.spatial_range, self.kv_stride, x.device)
            inside = rows[:, None, :, None] & cols[None, :, None, :]
            energy = energy.masked_fill(~inside, float("-inf"))

        attention = F.softmax(energy.reshape(n, heads, h * w, h_kv * w_kv), dim=3)
        value = self.value_conv(x_kv).reshape(n, heads, self.v_dim, h_kv * w_kv)
        out = torch.matmul(attention, value.transpose(2, 3))
        out = self.proj_conv(out.transpose(2, 3).reshape(n, heads * self.v_dim, h, w))
        if self.q_downsample is not None and not saliency_only:
            out = F.interpolate(out, size=x.shape[2:], mode="bilinear", align_corners=False)
        return self.gamma * out + x
