"""The DETR model every variant is built as, its post-processing, and `build`.

DETR (Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020,
arXiv 2005.12872) detects objects as a set prediction:

    image -> CNN backbone -> 1x1 conv to D channels -> + sine positions -> encoder -> memory
    Q object queries -> decoder (self-attention, cross-attention to memory) -> per query:
        class logits (linear) and a box (3-layer MLP, sigmoid, normalised cx, cy, w, h)

    (1) loss = sum over the Hungarian-matched pairs (see matcher.py, losses.py)

The variants change only two parts, which `build` takes from the variant's module:
    queries  what a query is: a learned embedding (DETR, SMCA), an embedding plus a 2-D
             reference point (Conditional DETR), a learned 4-D anchor box (DN-DETR's DAB form)
    decoder  how a query looks at the memory (conditional spatial query, Gaussian prior, ...)
and, for SMCA's multi-scale form, the input projection and the encoder. Every decoder
returns `box_ref`, what to add to the box head's logits before the sigmoid (the inverse-
sigmoid reference point or anchor; None for DETR), so the box head here is the same for all.

Denoising (DN-DETR) is an add-on: in training, noised copies of the ground truth are put in
front of the matching queries, hidden from them by an attention mask, and split off again
after the decoder into out['dn'], which the criterion supervises without matching.
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minidetr import box_ops, conditional_attn, smca
from minidetr.backbone import Backbone, PositionEmbeddingSine, load_backbone_weights
from minidetr.config import Config
from minidetr.denoising import Denoiser
from minidetr.losses import SetCriterion, build_weight_dict
from minidetr.matcher import HungarianMatcher
from minidetr.transformer import (MLP, Decoder, DecoderLayer, Encoder, EncoderLayer, LearnedQueries,
                                  clones, xavier_init)


# ---- small parts shared by the variants ----

class LevelProjection(nn.Module):
    """1x1 convs bringing each backbone level to D channels (DETR: C5's 2048 -> 256)."""

    def __init__(self, in_channels, dim):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, dim, kernel_size=1) for c in in_channels)

    def forward(self, levels):
        """levels: list of (feat [B, Ci, y, x], mask [B, y, x]) -> list of ([B, D, y, x], mask)."""
        return [(proj(feat), mask) for proj, (feat, mask) in zip(self.proj, levels)]


def unpadded_sizes(mask):
    """mask [B, H, W] True on padding -> [B, 2] (w, h) of each image in pixels."""
    real = ~mask
    return torch.stack([real.any(1).sum(-1), real.any(2).sum(-1)], -1)


# ---- the model ----

class DETR(nn.Module):
    """backbone -> projection -> encoder -> decoder(queries) -> class and box heads.

    forward(images [B, 3, H, W], mask [B, H, W] True on padding, targets=None) returns
        pred_logits [B, Q, K]  K = classes + 1 (softmax, last = no object) or classes (focal)
        pred_boxes  [B, Q, 4]  cxcywh in [0, 1] of the unpadded image
        aux_outputs            the same two for decoder layers 0 .. L-2 (when aux_loss)
        dn                     training with denoising only: the denoising queries' outputs
    `targets` are read only in training with denoising (to build the noised queries).
    """

    def __init__(self, backbone, input_proj, pos_enc, encoder, queries, decoder, class_embed,
                 bbox_embed, aux_loss=True, denoiser=None):
        super().__init__()
        self.backbone, self.input_proj, self.pos_enc = backbone, input_proj, pos_enc
        self.encoder, self.queries, self.decoder = encoder, queries, decoder
        self.class_embed, self.bbox_embed = class_embed, bbox_embed
        self.aux_loss, self.denoiser = aux_loss, denoiser

    def encode(self, images, mask):
        """-> memory [B, N, D], pos [B, N, D], pad_mask [B, N], spatial_shapes [(y, x), ...]."""
        levels = self.input_proj(self.backbone(images, mask))
        srcs, poss, pads, shapes = [], [], [], []
        for src, level_mask in levels:
            shapes.append(tuple(src.shape[-2:]))
            pos = self.pos_enc(level_mask).to(src.dtype)                  # [B, D, y, x]
            srcs.append(rearrange(src, 'b c y x -> b (y x) c'))
            poss.append(rearrange(pos, 'b c y x -> b (y x) c'))
            pads.append(rearrange(level_mask, 'b y x -> b (y x)'))
        src, pos, pad_mask = torch.cat(srcs, 1), torch.cat(poss, 1), torch.cat(pads, 1)
        return self.encoder(src, pos, pad_mask, shapes), pos, pad_mask, shapes

    def forward(self, images, mask, targets=None):
        memory, pos, pad_mask, shapes = self.encode(images, mask)
        tgt, query_pos, ref_points = self.queries(images.shape[0])
        num_queries, dn, self_attn_mask = tgt.shape[1], None, None
        if self.denoiser is not None:
            tgt = self.denoiser.match_content(images.shape[0], num_queries).to(tgt.dtype)
            if self.training:
                if targets is None:
                    raise ValueError("training with denoising needs the targets: model(images, mask, targets)")
                dn = self.denoiser(targets)
                dn_pos, dn_ref = self.queries.from_boxes(dn.boxes)
                # one decoder pass over [denoising groups | matching queries]
                tgt = torch.cat([dn.content.to(tgt.dtype), tgt], 1)
                query_pos = None if query_pos is None else torch.cat([dn_pos.to(query_pos.dtype), query_pos], 1)
                ref_points = torch.cat([dn_ref.to(ref_points.dtype), ref_points], 1)
                self_attn_mask = dn.attn_mask(num_queries)
        hs, box_ref = self.decoder(tgt, memory, memory_pos=pos, pad_mask=pad_mask,
                                   query_pos=query_pos, ref_points=ref_points,
                                   self_attn_mask=self_attn_mask, spatial_shapes=shapes,
                                   image_sizes=unpadded_sizes(mask))
        logits, boxes = self.heads(hs, box_ref)                            # [L, B, Q', *]
        if dn is None:
            return self._pack(logits, boxes)
        p = dn.pad_size
        out = self._pack(logits[:, :, p:], boxes[:, :, p:])
        out["dn"] = self._pack(logits[:, :, :p], boxes[:, :, :p])
        out["dn"].update(indices=dn.indices, num_dn=dn.num_dn)
        return out

    def heads(self, hs, box_ref):
        """hs [L, B, Q, D] -> logits [L, B, Q, K], boxes [L, B, Q, 4] sigmoid cxcywh.

        With a reference (point or anchor, as logits) the box head predicts an offset from
        it: box = sigmoid(MLP(hs) + [ref, 0...]) -- the reference fills the first r coords.
        """
        box_logits = self.bbox_embed(hs)
        if box_ref is not None:
            r = box_ref.shape[-1]
            box_logits = torch.cat([box_logits[..., :r] + box_ref, box_logits[..., r:]], -1)
        return self.class_embed(hs), box_logits.sigmoid()

    def _pack(self, logits, boxes):
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(logits[:-1], boxes[:-1])]
        return out


# ---- post-processing ----

class PostProcess(nn.Module):
    """Model output -> per image dict(scores [k], labels [k], boxes [k, 4] xyxy in pixels,
    query_ids [k], the query each detection came from).

    softmax heads (DETR): drop the no-object column, one detection per query (its best class).
    sigmoid heads (focal): the top `num_select` (query, class) pairs over all Q x K scores,
    so one query may give several classes (Conditional DETR's post-processing).
    """

    def __init__(self, focal, num_select=100):
        super().__init__()
        self.focal, self.num_select = focal, num_select

    @torch.no_grad()
    def forward(self, outputs, orig_sizes):
        """orig_sizes: [B, 2] (h, w) of the original images."""
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        if self.focal:
            probs = rearrange(logits.sigmoid(), 'b q k -> b (q k)')
            k = min(self.num_select, probs.shape[1])
            scores, flat_idx = probs.topk(k, dim=1)
            labels = flat_idx % logits.shape[2]
            query_idx = flat_idx // logits.shape[2]
            boxes = torch.gather(boxes, 1, query_idx[..., None].expand(-1, -1, 4))
        else:
            scores, labels = F.softmax(logits, -1)[..., :-1].max(-1)
            query_idx = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
        h, w = orig_sizes.float().unbind(-1)
        scale = torch.stack([w, h, w, h], -1)[:, None, :]                  # [B, 1, 4]
        boxes_xyxy = box_ops.box_cxcywh_to_xyxy(boxes) * scale
        return [{"scores": s, "labels": l, "boxes": b, "query_ids": q}
                for s, l, b, q in zip(scores, labels, boxes_xyxy, query_idx)]


# ---- build ----

def _variant_parts(cfg, bbox_embed):
    """The queries and decoder (and, for multi-scale SMCA, encoder and projection) of a variant."""
    if cfg.variant in ("conditional", "dn"):
        return conditional_attn.build_parts(cfg, bbox_embed)
    if cfg.variant == "smca":
        return smca.build_parts(cfg, bbox_embed)
    layers = clones(DecoderLayer(cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward, cfg.dropout,
                                 cfg.activation), cfg.dec_layers)
    decoder = Decoder(layers, cfg.hidden_dim)
    xavier_init(decoder)
    return dict(queries=LearnedQueries(cfg.num_queries, cfg.hidden_dim), decoder=decoder)


def build(cfg="detr", preset="paper", **overrides):
    """-> (model, criterion, postprocess) for a Config, or for a variant name + preset + overrides."""
    if isinstance(cfg, str):
        cfg = Config.for_variant(cfg, preset, **overrides)
    cfg.validate()
    focal = cfg.focal_alpha is not None
    num_logits = cfg.num_classes if focal else cfg.num_classes + 1   # + DETR's no-object class
    class_embed = nn.Linear(cfg.hidden_dim, num_logits)
    bbox_embed = MLP(cfg.hidden_dim, cfg.hidden_dim, 4, 3)
    if focal:  # prior 0.01 for every class (RetinaNet's trick, used by all focal variants)
        nn.init.constant_(class_embed.bias, -torch.log(torch.tensor((1 - 0.01) / 0.01)).item())
    if cfg.variant in ("conditional", "dn"):  # start every box at its reference point
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)

    parts = _variant_parts(cfg, bbox_embed)
    backbone = Backbone(cfg.backbone, frozen_bn=cfg.frozen_bn, freeze_stem=cfg.freeze_stem,
                        train_backbone=cfg.lr_backbone > 0, dilation=cfg.dilation,
                        return_layers=parts.get("return_layers", (cfg.backbone_stage,)))
    if cfg.backbone_weights:
        load_backbone_weights(backbone, cfg.backbone_weights)
    input_proj = parts.get("input_proj") or LevelProjection(backbone.num_channels, cfg.hidden_dim)
    encoder = parts.get("encoder")
    if encoder is None:
        pos_scale = MLP(cfg.hidden_dim, cfg.hidden_dim, cfg.hidden_dim, 2) if cfg.variant == "dn" else None
        layer = EncoderLayer(cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.activation)
        encoder = Encoder(clones(layer, cfg.enc_layers), pos_scale)
        xavier_init(encoder)
    denoiser = None
    if cfg.dn:
        denoiser = Denoiser(cfg.num_classes, cfg.hidden_dim, num_groups=cfg.scalar,
                            label_noise_prob=cfg.label_noise_scale, box_noise_scale=cfg.box_noise_scale)
    model = DETR(backbone, input_proj, PositionEmbeddingSine(cfg.hidden_dim // 2, cfg.pe_temperature),
                 encoder, parts["queries"], parts["decoder"], class_embed, bbox_embed,
                 aux_loss=cfg.aux_loss, denoiser=denoiser)

    matcher = HungarianMatcher(cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou,
                               focal_alpha=cfg.focal_alpha, giou_eps=cfg.giou_eps)
    weight_dict = build_weight_dict(cfg.cls_loss_coef, cfg.bbox_loss_coef, cfg.giou_loss_coef,
                                    cfg.dec_layers, cfg.aux_loss, cfg.dn)
    criterion = SetCriterion(cfg.num_classes, matcher, weight_dict, eos_coef=cfg.eos_coef,
                             focal_alpha=cfg.focal_alpha, aux_loss=cfg.aux_loss, giou_eps=cfg.giou_eps)
    postprocess = PostProcess(focal, cfg.num_select)
    return model, criterion, postprocess
