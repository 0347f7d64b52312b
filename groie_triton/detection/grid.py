"""Grid R-CNN (Lu et al., CVPR 2019, with Grid R-CNN Plus's half-size heatmaps) on torchvision's detection parts.

The semantics are mmdetection's ``GridRoIHead`` + ``GridHead`` (``configs/grid_rcnn``), the implementation the
GRoIE paper's Grid R-CNN row was measured with:

* the box branch (a 7x7 RoI extractor, two shared FC layers) only **classifies**: mmdetection's config sets
  ``with_reg=False``, so there is no box regression loss and no deltas; at test time the (clipped) proposals
  are scored, filtered by score, NMS-ed per class (IoU 0.3) and capped, and only then refined by the grid;
* the grid branch pools 14x14 RoI features (its own extractor), runs 8 3x3 convs with GroupNorm (36 groups;
  the first with stride 2, so 7x7), splits the channels into 9 point groups, fuses each point's features with
  its 4-neighbours' in two orders (first order: from the neighbours' features; second order: from the
  neighbours' first-order features; each transition a 5x5 depthwise + 1x1 conv), and two grouped 4x4
  deconvolutions give one 28x28 heatmap per point: the point's sub-region of a 56x56 map over the RoI
  expanded 2x;
* training: the positive RoIs (jittered by up to 15% of their size) are sub-sampled to at most 192, their
  targets are a radius-1 disc (5 pixels) at each ground-truth grid point, and the loss is sigmoid
  cross-entropy (mean over pixels, weight 15) on the fused and on the unfused heatmaps;
* decoding: each point's heatmap argmax, mapped back to image coordinates; each box edge is the
  sigmoid-score-weighted mean of the 3 points on it.

mmdetection's GridHead names its convs "dilated" in the paper's words but builds them with dilation 1; that
is the default here too (``dilation`` selects the paper's reading).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

from groie_triton.bricks import ConvModule

__all__ = [
    "GRID_LOSS_WEIGHT",
    "GRID_NMS_THRESH",
    "JITTER_AMPLITUDE",
    "MAX_GRID_ROIS",
    "POS_RADIUS",
    "ClassOnlyPredictor",
    "GridHead",
    "GridRCNN",
    "GridRoIHeads",
    "grid_neighbors",
    "grid_sub_regions",
]

# mmdetection's grid_rcnn config (train_cfg.rcnn / test_cfg.rcnn and GridHead's loss).
POS_RADIUS = 1
MAX_GRID_ROIS = 192
JITTER_AMPLITUDE = 0.15
GRID_LOSS_WEIGHT = 15.0
GRID_NMS_THRESH = 0.3


def grid_neighbors(grid_size: int) -> list[tuple[int, ...]]:
    """The 4-neighbours of each grid point. Point ``i * grid_size + j`` is column i (x), row j (y); its
    neighbours are listed left, up, down, right (those that exist)."""
    neighbors = []
    for i in range(grid_size):
        for j in range(grid_size):
            around = []
            if i > 0:
                around.append((i - 1) * grid_size + j)
            if j > 0:
                around.append(i * grid_size + j - 1)
            if j < grid_size - 1:
                around.append(i * grid_size + j + 1)
            if i < grid_size - 1:
                around.append((i + 1) * grid_size + j)
            neighbors.append(tuple(around))
    return neighbors


def grid_sub_regions(grid_size: int, whole_map_size: int) -> list[tuple[int, int, int, int]]:
    """(x1, y1, x2, y2) of each point's heatmap inside the whole map (Grid R-CNN Plus): a half-size square
    at the map's near edge, far edge or (for inner points) starting a quarter before the point's position."""
    half = whole_map_size // 4 * 2

    def start(idx: int) -> int:
        if idx == 0:
            return 0
        if idx == grid_size - 1:
            return half
        return max(int((idx / (grid_size - 1) - 0.25) * whole_map_size), 0)

    regions = []
    for p in range(grid_size * grid_size):
        x1, y1 = start(p // grid_size), start(p % grid_size)
        regions.append((x1, y1, x1 + half, y1 + half))
    return regions


class GridHead(nn.Module):
    """mmdetection's GridHead: RoI features ``[R, in_channels, 14, 14]`` -> per-point heatmap logits.

    ``forward`` returns ``{"fused": [R, P, 28, 28], "unfused": ...}`` (P = ``grid_points``, 28 = half of the
    56x56 whole map); ``unfused`` (the heatmaps of the features before the neighbour fusion, an auxiliary
    training signal) is computed only in training mode, in eval mode it is ``fused``.

    Args:
        in_channels: RoI feature channels. roi_feat_size: RoI side (square).
        grid_points: a square number >= 4. num_convs: 3x3 conv + GN + ReLU layers (the first has stride 2).
        point_feat_channels: channels per point (the convs are ``grid_points * point_feat_channels`` wide).
        num_groups: GroupNorm groups of the convs (mmdetection: 36; must divide their width).
        dilation: dilation of the stride-1 convs (mmdetection: 1).
        deconv_kernel_size: of the two grouped, stride-2 transposed convs.

    Raises:
        ValueError: a non-square or too small ``grid_points``, or ``num_groups`` that does not divide the width.
    """

    def __init__(
        self,
        in_channels: int = 256,
        roi_feat_size: int = 14,
        grid_points: int = 9,
        num_convs: int = 8,
        point_feat_channels: int = 64,
        num_groups: int = 36,
        dilation: int = 1,
        conv_kernel_size: int = 3,
        deconv_kernel_size: int = 4,
    ) -> None:
        super().__init__()
        self.grid_size = math.isqrt(grid_points)
        if grid_points < 4 or self.grid_size**2 != grid_points:
            raise ValueError(f"grid_points must be a square number >= 4, got {grid_points}")
        width = grid_points * point_feat_channels
        if width % num_groups:
            raise ValueError(
                f"num_groups={num_groups} must divide grid_points * point_feat_channels = {width} "
                f"(point_feat_channels a multiple of {num_groups // math.gcd(num_groups, grid_points)})"
            )
        self.grid_points = grid_points
        self.roi_feat_size = roi_feat_size
        self.point_feat_channels = point_feat_channels
        self.whole_map_size = roi_feat_size * 4
        self.heatmap_size = self.whole_map_size // 4 * 2
        self.sub_regions = grid_sub_regions(self.grid_size, self.whole_map_size)
        self.neighbor_points = grid_neighbors(self.grid_size)

        gn = dict(type="GN", num_groups=num_groups)
        pad = (conv_kernel_size - 1) // 2
        self.convs = nn.Sequential(
            *(
                ConvModule(
                    in_channels if i == 0 else width,
                    width,
                    conv_kernel_size,
                    stride=2 if i == 0 else 1,
                    padding=pad if i == 0 else pad * dilation,
                    dilation=1 if i == 0 else dilation,
                    norm_cfg=gn,
                    bias=True,
                )
                for i in range(num_convs)
            )
        )
        deconv = dict(kernel_size=deconv_kernel_size, stride=2, padding=(deconv_kernel_size - 2) // 2)
        self.deconv1 = nn.ConvTranspose2d(width, width, groups=grid_points, **deconv)
        self.norm1 = nn.GroupNorm(grid_points, width)
        self.deconv2 = nn.ConvTranspose2d(width, grid_points, groups=grid_points, **deconv)

        def transition() -> nn.Sequential:
            c = point_feat_channels
            return nn.Sequential(nn.Conv2d(c, c, 5, padding=2, groups=c), nn.Conv2d(c, c, 1))

        self.forder_trans = nn.ModuleList(
            nn.ModuleList(transition() for _ in around) for around in self.neighbor_points
        )
        self.sorder_trans = nn.ModuleList(
            nn.ModuleList(transition() for _ in around) for around in self.neighbor_points
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmdetection's init: Kaiming-normal (fan_out, ReLU) convs with zero bias, N(0, 0.001) deconvs with
        zero bias except the last, whose bias starts every heatmap at probability 0.01."""
        for trans in (self.forder_trans, self.sorder_trans):
            for m in trans.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)
        for deconv in (self.deconv1, self.deconv2):
            nn.init.normal_(deconv.weight, std=0.001)
            nn.init.zeros_(deconv.bias)
        nn.init.constant_(self.deconv2.bias, -math.log(0.99 / 0.01))

    def fuse(self, x: torch.Tensor) -> torch.Tensor:
        """First- then second-order feature fusion between neighbouring points: ``[R, P*c, h, w]`` in and out.

        first_i = x_i + sum_n T1_in(x_n); second_i = x_i + sum_n T2_in(first_n), n over i's 4-neighbours.
        """
        c = self.point_feat_channels
        points = [x[:, i * c : (i + 1) * c] for i in range(self.grid_points)]
        first = []
        for i, around in enumerate(self.neighbor_points):
            out = points[i]
            for j, n in enumerate(around):
                out = out + self.forder_trans[i][j](points[n])
            first.append(out)
        second = []
        for i, around in enumerate(self.neighbor_points):
            out = points[i]
            for j, n in enumerate(around):
                out = out + self.sorder_trans[i][j](first[n])
            second.append(out)
        return torch.cat(second, dim=1)

    def _heatmap(self, x: torch.Tensor) -> torch.Tensor:
        return self.deconv2(F.relu(self.norm1(self.deconv1(x))))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[-2:] != (self.roi_feat_size, self.roi_feat_size):
            raise ValueError(f"GridHead expects {self.roi_feat_size}x{self.roi_feat_size} RoI features, got {x.shape}")
        x = self.convs(x)
        fused = self._heatmap(self.fuse(x))
        unfused = self._heatmap(x) if self.training else fused
        return {"fused": fused, "unfused": unfused}

    def targets(self, rois: torch.Tensor, gt_boxes: torch.Tensor, pos_radius: int = POS_RADIUS) -> torch.Tensor:
        """Heatmap targets ``[R, P, 28, 28]`` (float 0/1) of RoIs ``[R, 4]`` matched to ground truth ``[R, 4]``.

        On the 56x56 map over each RoI expanded 2x about its centre, grid point p of the ground-truth box
        (fractions (p // g, p % g) / (g - 1) of its width and height) falls on pixel (cx, cy) (truncated);
        the pixels within ``pos_radius`` of it (a disc: 5 pixels for radius 1) are positive; then each point
        keeps its sub-region. RoIs whose expanded width or height is at most g pixels get no positives.
        """
        g, size = self.grid_size, self.whole_map_size
        w, h = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
        x1, y1 = rois[:, 0] - w / 2, rois[:, 1] - h / 2
        ew, eh = (rois[:, 2] + w / 2 - x1)[:, None], (rois[:, 3] + h / 2 - y1)[:, None]
        idx = torch.arange(self.grid_points, device=rois.device)
        factor_x = 1 - (idx // g).to(rois.dtype) / (g - 1)
        factor_y = 1 - (idx % g).to(rois.dtype) / (g - 1)
        point_x = factor_x * gt_boxes[:, 0:1] + (1 - factor_x) * gt_boxes[:, 2:3]
        point_y = factor_y * gt_boxes[:, 1:2] + (1 - factor_y) * gt_boxes[:, 3:4]
        cx = torch.trunc((point_x - x1[:, None]) / ew * size)[..., None, None]  # [R, P, 1, 1]
        cy = torch.trunc((point_y - y1[:, None]) / eh * size)[..., None, None]
        pix = torch.arange(size, device=rois.device, dtype=rois.dtype)
        disc = (pix[None, :] - cx) ** 2 + (pix[:, None] - cy) ** 2 <= pos_radius**2  # [R, P, size, size]
        valid = ((ew > g) & (eh > g))[..., None, None]
        whole = (disc & valid).to(rois.dtype)
        return torch.stack(
            [whole[:, p, y1s:y2s, x1s:x2s] for p, (x1s, y1s, x2s, y2s) in enumerate(self.sub_regions)], dim=1
        )

    @staticmethod
    def loss(pred: dict[str, torch.Tensor], targets: torch.Tensor, weight: float = GRID_LOSS_WEIGHT) -> torch.Tensor:
        """Sigmoid cross-entropy, mean over every heatmap pixel, times ``weight``, fused plus unfused."""
        fused = F.binary_cross_entropy_with_logits(pred["fused"], targets)
        unfused = F.binary_cross_entropy_with_logits(pred["unfused"], targets)
        return weight * (fused + unfused)

    def decode(self, boxes: torch.Tensor, heatmaps: torch.Tensor) -> torch.Tensor:
        """Boxes ``[R, 4]`` refined by heatmap logits ``[R, P, 28, 28]`` (computed for those boxes): ``[R, 4]``.

        Each point sits at its heatmap's argmax (pixel centre), mapped into the box expanded 2x; each edge is
        the mean of its g points weighted by their sigmoid peak scores. Not clipped to the image.
        """
        r, p, hm, wm = heatmaps.shape
        if p != self.grid_points or hm != wm or hm != self.heatmap_size:
            raise ValueError(f"heatmaps must be [R, {self.grid_points}, {self.heatmap_size}, {self.heatmap_size}]")
        scores, position = heatmaps.sigmoid().reshape(r, p, hm * wm).max(dim=2)
        offsets = torch.tensor(self.sub_regions, device=boxes.device)
        xs = (position % wm + offsets[:, 0]).to(boxes.dtype)
        ys = (position // wm + offsets[:, 1]).to(boxes.dtype)
        widths = (boxes[:, 2] - boxes[:, 0])[:, None]
        heights = (boxes[:, 3] - boxes[:, 1])[:, None]
        abs_x = (xs + 0.5) / wm * widths + (boxes[:, 0:1] - widths / 2)
        abs_y = (ys + 0.5) / hm * heights + (boxes[:, 1:2] - heights / 2)
        g = self.grid_size
        edges = (
            (abs_x, [i for i in range(g)]),  # x1: the left column
            (abs_y, [i * g for i in range(g)]),  # y1: the top row
            (abs_x, [p - g + i for i in range(g)]),  # x2: the right column
            (abs_y, [(i + 1) * g - 1 for i in range(g)]),  # y2: the bottom row
        )
        return torch.stack(
            [(coord[:, ids] * scores[:, ids]).sum(1) / scores[:, ids].sum(1) for coord, ids in edges], dim=1
        )


class ClassOnlyPredictor(nn.Module):
    """The box branch's last layer when it only classifies (mmdetection's ``with_reg=False``): ``[R, C_in]`` (or
    ``[R, C, h, w]``, flattened) -> class logits ``[R, num_classes]`` (background included)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_score(x.flatten(start_dim=1))


def _jitter(boxes: torch.Tensor, image_shape: tuple[int, int], amplitude: float) -> torch.Tensor:
    """mmdetection's GridRoIHead._random_jitter: shift the centre and scale the size by U(-a, a) of the size,
    clip to [0, W - 1] x [0, H - 1]."""
    offsets = torch.empty(boxes.shape[0], 4, device=boxes.device, dtype=boxes.dtype).uniform_(-amplitude, amplitude)
    centre = (boxes[:, 2:4] + boxes[:, :2]) / 2
    size = (boxes[:, 2:4] - boxes[:, :2]).abs()
    centre = centre + size * offsets[:, :2]
    size = size * (1 + offsets[:, 2:])
    out = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    h, w = image_shape
    out[:, 0::2] = out[:, 0::2].clamp(min=0, max=w - 1)
    out[:, 1::2] = out[:, 1::2].clamp(min=0, max=h - 1)
    return out


class GridRoIHeads(RoIHeads):
    """torchvision's RoIHeads with mmdetection's GridRoIHead behaviour (see the module docstring).

    ``box_predictor`` returns class logits only (:class:`ClassOnlyPredictor`); ``grid_roi_pool`` is any
    torchvision-style pooler (``MultiScaleRoIAlign`` or ``GRoIEPooler``) giving ``grid_head``'s 14x14 input.
    Training losses: ``loss_classifier`` and ``loss_grid``. Detections: ``boxes`` (grid-refined, clipped),
    ``labels``, ``scores`` (the classifier's).
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        grid_roi_pool: nn.Module,
        grid_head: GridHead,
        *,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_thresh: float = 0.05,
        nms_thresh: float = GRID_NMS_THRESH,
        detections_per_img: int = 100,
        max_grid_rois: int = MAX_GRID_ROIS,
        pos_radius: int = POS_RADIUS,
        jitter_amplitude: float = JITTER_AMPLITUDE,
        grid_loss_weight: float = GRID_LOSS_WEIGHT,
    ) -> None:
        super().__init__(
            box_roi_pool,
            box_head,
            box_predictor,
            fg_iou_thresh,
            bg_iou_thresh,
            batch_size_per_image,
            positive_fraction,
            None,
            score_thresh,
            nms_thresh,
            detections_per_img,
        )
        self.grid_roi_pool = grid_roi_pool
        self.grid_head = grid_head
        self.max_grid_rois = max_grid_rois
        self.pos_radius = pos_radius
        self.jitter_amplitude = jitter_amplitude
        self.grid_loss_weight = grid_loss_weight

    def _grid_loss(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        matched_idxs: list[torch.Tensor],
        labels: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        image_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        rois, gts, owner = [], [], []
        for i, (props, idxs, lab, tgt) in enumerate(zip(proposals, matched_idxs, labels, targets, strict=True)):
            pos = torch.where(lab > 0)[0]
            rois.append(_jitter(props[pos], image_shapes[i], self.jitter_amplitude))
            gts.append(tgt["boxes"][idxs[pos]].to(props.dtype))
            owner.append(torch.full((len(pos),), i, dtype=torch.long, device=props.device))
        rois_all, gts_all, owner_all = torch.cat(rois), torch.cat(gts), torch.cat(owner)
        if rois_all.shape[0] == 0:
            # No positives (no ground truth): a zero that still reaches every grid parameter, so DDP's
            # all-reduce finds a gradient for each.
            params = [*self.grid_head.parameters(), *self.grid_roi_pool.parameters()]
            return sum(p.sum() for p in params) * 0.0
        # mmdetection pools every positive, then keeps a random max_grid_rois; pooling only the kept ones
        # gives the same features. Sorted, the kept RoIs stay grouped by image, as the pooler wants them.
        keep = torch.randperm(rois_all.shape[0])[: self.max_grid_rois].sort().values.to(rois_all.device)
        rois_all, gts_all, owner_all = rois_all[keep], gts_all[keep], owner_all[keep]
        per_image = [rois_all[owner_all == i] for i in range(len(proposals))]
        grid_feats = self.grid_roi_pool(features, per_image, image_shapes)
        pred = self.grid_head(grid_feats)
        return self.grid_head.loss(
            pred, self.grid_head.targets(rois_all, gts_all, self.pos_radius), self.grid_loss_weight
        )

    def _detect(
        self, class_logits: torch.Tensor, proposals: list[torch.Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """mmdetection's bbox test without regression: the clipped proposal scored for every class, score
        filter, per-class NMS, the best ``detections_per_img``."""
        num_classes = class_logits.shape[-1]
        all_scores = F.softmax(class_logits, -1).split([len(p) for p in proposals])
        boxes_out, scores_out, labels_out = [], [], []
        for props, scores, shape in zip(proposals, all_scores, image_shapes, strict=True):
            props = box_ops.clip_boxes_to_image(props, shape)
            boxes = props[:, None].expand(-1, num_classes - 1, 4).reshape(-1, 4)
            labels = torch.arange(1, num_classes, device=props.device).repeat(len(props))
            scores = scores[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            boxes_out.append(boxes[keep])
            scores_out.append(scores[keep])
            labels_out.append(labels[keep])
        return boxes_out, scores_out, labels_out

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if self.training:
            proposals, matched_idxs, labels, _ = self.select_training_samples(proposals, targets)
        class_logits = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals, image_shapes)))
        if self.training:
            losses = {
                "loss_classifier": F.cross_entropy(class_logits, torch.cat(labels, dim=0)),
                "loss_grid": self._grid_loss(features, proposals, matched_idxs, labels, targets, image_shapes),
            }
            return [], losses
        boxes, scores, labels = self._detect(class_logits, proposals, image_shapes)
        if sum(len(b) for b in boxes):
            heatmaps = self.grid_head(self.grid_roi_pool(features, boxes, image_shapes))["fused"]
            refined = self.grid_head.decode(torch.cat(boxes), heatmaps).split([len(b) for b in boxes])
            boxes = [box_ops.clip_boxes_to_image(b, s) for b, s in zip(refined, image_shapes, strict=True)]
        result = [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(boxes, scores, labels, strict=True)]
        return result, {}


class GridRCNN(FasterRCNN):
    """Grid R-CNN: torchvision's Faster R-CNN (transform, backbone, RPN) with :class:`GridRoIHeads`.

    Takes FasterRCNN's keyword arguments (``box_predictor`` must be a :class:`ClassOnlyPredictor`;
    ``box_nms_thresh`` defaults to mmdetection's 0.3) plus the grid RoI pooler and :class:`GridHead`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        grid_roi_pool: nn.Module,
        grid_head: GridHead,
        *,
        box_predictor: nn.Module,
        box_nms_thresh: float = GRID_NMS_THRESH,
        **kwargs,
    ) -> None:
        if not isinstance(box_predictor, ClassOnlyPredictor):
            raise ValueError("Grid R-CNN's box branch only classifies: box_predictor must be a ClassOnlyPredictor")
        super().__init__(backbone, box_predictor=box_predictor, box_nms_thresh=box_nms_thresh, **kwargs)
        old = self.roi_heads
        self.roi_heads = GridRoIHeads(
            old.box_roi_pool,
            old.box_head,
            old.box_predictor,
            grid_roi_pool,
            grid_head,
            fg_iou_thresh=old.proposal_matcher.high_threshold,
            bg_iou_thresh=old.proposal_matcher.low_threshold,
            batch_size_per_image=old.fg_bg_sampler.batch_size_per_image,
            positive_fraction=old.fg_bg_sampler.positive_fraction,
            score_thresh=old.score_thresh,
            nms_thresh=old.nms_thresh,
            detections_per_img=old.detections_per_img,
        )
