"""The DETR model every variant is built as, its post-processing, and `build`.

DETR (Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020,
arXiv 2005.12872) detects objects as a set prediction:

    image -> CNN backbone -> 1x1 conv to D channels -> + sine positions -> encoder -> memory
    Q object queries -> decoder (self-attention, cross-attention to memory) -> per query:
        class logits (linear) and a box (3-layer MLP, sigmoid, normalised cx, cy, w, h)

    (1) loss = sum over the Hungarian-matched pairs (see matcher.py, losses.py)

The variants change only two parts, which `build` takes from the variant's module
(VARIANT_BUILDERS below; detr.py never asks which variant it builds):
    queries  what a query is: a learned embedding (DETR, SMCA), an embedding plus a 2-D
             reference point (Conditional DETR), a learned 4-D anchor box (DN-DETR's DAB form)
    decoder  how a query looks at the memory (conditional spatial query, Gaussian prior, ...)
and, for SMCA's multi-scale form, the input projection and the encoder. Every decoder
returns `box_ref`, what to add to the box head's logits before the sigmoid (the inverse-
sigmoid reference point or anchor; None for DETR), so the box head here is the same for all.

Denoising (DN-DETR) is an add-on, all in denoising.py: Denoiser.join puts noised copies of
the ground truth in front of the matching queries in training, hidden from them by an
attention mask, and Denoiser.split takes them off again after the heads into out['dn'],
which the criterion supervises without matching. `--variant dn` is dab's model with it.
"""
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from minidetr import box_ops, conditional_attn, smca, transformer
from minidetr.backbone import Backbone, PositionEmbeddingSine, load_backbone_weights
from minidetr.config import Config
from minidetr.denoising import Denoiser
from minidetr.losses import SetCriterion, build_weight_dict
from minidetr.matcher import HungarianMatcher
from minidetr.transformer import MLP

# Each variant's module builds its parts with their inits: (queries and decoder, then the
# encoder, built after the backbone as the references order their draws). dn is dab's
# model; what denoising adds (cfg.dn) is denoising.Denoiser.
VARIANT_BUILDERS = {
    "detr": (transformer.build_parts, transformer.build_encoder),
    "conditional": (conditional_attn.build_conditional_parts, transformer.build_encoder),
    "smca": (smca.build_parts, transformer.build_encoder),
    "dab": (conditional_attn.build_anchor_parts, conditional_attn.build_anchor_encoder),
    "dn": (conditional_attn.build_anchor_parts, conditional_attn.build_anchor_encoder),
}


# ---- small parts shared by the variants ----

class LevelProjection(nn.Module):
    """1x1 convs bringing each backbone level to D channels (DETR: C5's 2048 -> 256)."""

    def __init__(self, in_channels, dim):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, dim, kernel_size=1) for c in in_channels)

    def forward(self, levels):
        """levels: list of (feat [B, Ci, y, x], mask [B, y, x]) -> list of ([B, D, y, x], mask)."""
        return [(proj(feat), mask) for proj, (feat, mask) in zip(self.proj, levels)]


# ---- the model ----

class DETR(nn.Module):
    """backbone -> projection -> encoder -> decoder(queries) -> class and box heads.

    forward(images [B, 3, H, W], mask [B, H, W] True on padding, targets=None) returns
        pred_logits [B, Q, K]  K = classes + 1 (softmax, last = no object) or classes (focal)
        pred_boxes  [B, Q, 4]  cxcywh in [0, 1] of the unpadded image
        aux_outputs            the same two for decoder layers 0 .. L-2 (when aux_loss)
        dn                     training with denoising only: the denoising queries' outputs
    `targets` are read only in training with denoising (to build the noised queries).
    encoder_inputs, decoder_inputs: None, or a function (mask, spatial_shapes) -> the extra
    keyword inputs a variant's encoder or decoder reads (SMCA: the map layout).
    """

    def __init__(self, backbone, input_proj, pos_enc, encoder, queries, decoder, class_embed,
                 bbox_embed, aux_loss=True, denoiser=None, encoder_inputs=None, decoder_inputs=None):
        super().__init__()
        self.backbone, self.input_proj, self.pos_enc = backbone, input_proj, pos_enc
        self.encoder, self.queries, self.decoder = encoder, queries, decoder
        self.class_embed, self.bbox_embed = class_embed, bbox_embed
        self.aux_loss, self.denoiser = aux_loss, denoiser
        self.encoder_inputs, self.decoder_inputs = encoder_inputs, decoder_inputs

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
        extra = self.encoder_inputs(mask, shapes) if self.encoder_inputs else {}
        memory = self.encoder(src, pos, pad_mask, **extra)
        if hasattr(self.encoder, "memory_layout"):   # an encoder whose memory has other levels
            pos, pad_mask, shapes = self.encoder.memory_layout(pos, pad_mask, shapes)   # (SMCA released)
        return memory, pos, pad_mask, shapes

    def forward(self, images, mask, targets=None):
        memory, pos, pad_mask, shapes = self.encode(images, mask)
        queries = self.queries(images.shape[0])       # dict: tgt, and query_pos and/or ref_points
        dn = None
        if self.denoiser is not None:                 # [dn groups | matching queries], masked
            queries, dn = self.denoiser.join(queries, self.queries, targets if self.training else None)
        extra = self.decoder_inputs(mask, shapes) if self.decoder_inputs else {}
        hs, box_ref = self.decoder(memory=memory, memory_pos=pos, pad_mask=pad_mask, **queries, **extra)
        logits, boxes = self.predict(hs, box_ref)                          # [L, B, Q', *]
        if dn is None:
            return self._pack(logits, boxes)
        (logits, boxes), (dn_logits, dn_boxes) = self.denoiser.split(dn, logits, boxes)
        out = self._pack(logits, boxes)
        out["dn"] = dict(self._pack(dn_logits, dn_boxes), indices=dn.indices, num_dn=dn.num_dn)
        return out

    def predict(self, hs, box_ref):
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
        batch = self.batched(outputs, orig_sizes)
        return [dict(zip(batch, per_image)) for per_image in zip(*batch.values())]

    def batched(self, outputs, orig_sizes):
        """forward's detections as one dict of [B, k] tensors (boxes [B, k, 4]), no list over
        images: what an exported graph computes (a loop over B would fix B at export)."""
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        if self.focal:
            probs = rearrange(logits.sigmoid(), 'b q k -> b (q k)')
            k = min(self.num_select, probs.shape[1])
            scores, flat_idx = probs.topk(k, dim=1)
            labels = flat_idx % logits.shape[2]
            query_idx = flat_idx // logits.shape[2]
            boxes = torch.gather(boxes, 1, repeat(query_idx, 'b q -> b q box', box=4))
        else:
            scores, labels = F.softmax(logits, -1)[..., :-1].max(-1)
            query_idx = repeat(torch.arange(logits.shape[1], device=logits.device), 'q -> b q',
                               b=logits.shape[0])
        h, w = orig_sizes.float().unbind(-1)
        scale = torch.stack([w, h, w, h], -1)[:, None, :]                  # [B, 1, 4]
        boxes_xyxy = box_ops.box_cxcywh_to_xyxy(boxes) * scale
        return {"scores": scores, "labels": labels, "boxes": boxes_xyxy, "query_ids": query_idx}


# ---- build ----

def build(cfg="detr", preset="paper", **overrides):
    """-> (model, criterion, postprocess) for a Config, or for a variant name + preset + overrides.

    A Config is validated where it is made (Config.for_variant, eval.py's load); build reads it.
    """
    if isinstance(cfg, str):
        cfg = Config.for_variant(cfg, preset, **overrides)
    build_parts, build_encoder = VARIANT_BUILDERS[cfg.variant]
    focal = cfg.focal_alpha is not None
    num_logits = cfg.num_classes if focal else cfg.num_classes + 1   # + DETR's no-object class
    class_embed = nn.Linear(cfg.hidden_dim, num_logits)
    bbox_embed = MLP(cfg.hidden_dim, cfg.hidden_dim, 4, 3)
    if focal:  # prior 0.01 for every class (RetinaNet's trick, used by all focal variants)
        nn.init.constant_(class_embed.bias, -torch.log(torch.tensor((1 - 0.01) / 0.01)).item())

    parts = build_parts(cfg, bbox_embed)
    backbone = Backbone(cfg.backbone, frozen_bn=cfg.frozen_bn, freeze_stem=cfg.freeze_stem,
                        train_backbone=cfg.lr_backbone > 0, dilation=cfg.dilation,
                        return_layers=parts.get("return_layers", (cfg.backbone_stage,)),
                        precision=cfg.backbone_precision)
    if cfg.backbone_weights:
        load_backbone_weights(backbone, cfg.backbone_weights)
    input_proj = parts.get("input_proj") or LevelProjection(backbone.num_channels, cfg.hidden_dim)
    encoder = parts.get("encoder") or build_encoder(cfg)
    denoiser = Denoiser(cfg.num_classes, cfg.hidden_dim, num_groups=cfg.scalar,
                        label_noise_prob=cfg.label_noise_scale,
                        box_noise_scale=cfg.box_noise_scale, bucket=cfg.dn_bucket) if cfg.dn else None
    model = DETR(backbone, input_proj, PositionEmbeddingSine(cfg.hidden_dim // 2, cfg.pe_temperature),
                 encoder, parts["queries"], parts["decoder"], class_embed, bbox_embed,
                 aux_loss=cfg.aux_loss, denoiser=denoiser, encoder_inputs=parts.get("encoder_inputs"),
                 decoder_inputs=parts.get("decoder_inputs"))

    matcher = HungarianMatcher(cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou,
                               focal_alpha=cfg.focal_alpha, giou_eps=cfg.giou_eps)
    weight_dict = build_weight_dict(cfg.cls_loss_coef, cfg.bbox_loss_coef, cfg.giou_loss_coef,
                                    cfg.dec_layers, cfg.aux_loss, cfg.dn)
    criterion = SetCriterion(cfg.num_classes, matcher, weight_dict, eos_coef=cfg.eos_coef,
                             focal_alpha=cfg.focal_alpha, aux_loss=cfg.aux_loss, giou_eps=cfg.giou_eps)
    criterion.check_logits(class_embed.out_features)   # once, here, not on every loss call
    postprocess = PostProcess(focal, cfg.num_select)
    return model, criterion, postprocess
