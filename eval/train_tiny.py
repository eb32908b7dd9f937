"""Train the bundled tiny LLaVA (``models/tiny-llava-shapes``) from scratch on CPU on the shapes benchmark.

The model is a stock ``LlavaForConditionalGeneration`` (CLIP vision tower with a CLS token, 256 patch tokens,
Llama language model, word-level tokenizer). Training uses the ``train`` split of ``vtprune.shapes`` (a fresh
scene for every image; the test split uses other seeds) in two stages:

1. **Vision stage.** The CLIP tower learns dense targets that the generator knows exactly: for every patch the
   shape and the colour of the object covering it, whether it is an object's anchor (top-left) patch, and its row and
   column; the CLS token (of the layer that the ``cls`` pruning method reads) predicts which (colour, shape)
   pairs the scene holds and how many of each shape. The heads are training-only and are not saved.
2. **Language stage.** The tower is frozen; the projector and the Llama LM learn to answer. Each image is
   followed by ``--questions`` question/answer segments packed into one sequence: every segment sees the
   image prefix and itself only, at the same positions as a one-question prompt, so one forward pass trains
   many questions per image exactly as they are asked at test time. The loss is cross-entropy on the answer
   word and the end-of-sequence token after it, plus (``--attn-weight``, fading out over the second half) a
   grounding loss: two heads of LM layer 0 at each shape word attend to the patches of the objects of that
   shape (and to their anchor patches and BOS in the proportion n:1, a count), two heads of layer 1 at the
   answer position attend to the shape word(s) (or the colour word), and training-only linear read-outs of
   those states predict the colours, mean x and number of the objects named.

Each stage ends at its step count or at its share of ``--max-minutes`` of wall clock, whichever comes first
(the learning-rate schedule follows the further along of the two), so a run on a loaded machine ends on time.

``--eval-only`` (and the end of training) scores the saved model through the plain Hugging Face route
(``AutoProcessor`` + ``LlavaForConditionalGeneration.generate``) on ``eval/tasks/vtprune_shapes/test.jsonl``.

    python eval/train_tiny.py --out models/tiny-llava-shapes            # train, save, evaluate
    python eval/train_tiny.py --eval-only --out models/tiny-llava-shapes
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vtprune import shapes as S  # noqa: E402

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
NUM_PATCHES = S.GRID * S.GRID
MIN_PATCH_PIXELS = 6  # a patch belongs to an object when it holds at least this many of its pixels


# ----------------------------------------------------------------------------------------------------------
# Model


def build_model(processor, args) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=args.vision_width,
        intermediate_size=4 * args.vision_width,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=4,
        image_size=S.IMAGE_SIZE,
        patch_size=S.PATCH,
        hidden_act="quick_gelu",
        projection_dim=args.vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.text_width,
        intermediate_size=args.text_width * 8 // 3 // 32 * 32,
        num_hidden_layers=args.text_layers,
        num_attention_heads=args.text_width // 32,
        num_key_value_heads=args.text_width // 32,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=NUM_PATCHES,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 4
    return model


def pixel_batch(images) -> torch.Tensor:
    """CLIP normalisation of 224x224 RGB images (what the processor does to them)."""
    arr = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2)
    return (arr / 255.0 - CLIP_MEAN) / CLIP_STD


# ----------------------------------------------------------------------------------------------------------
# Dense targets from the generator's ground truth


def patch_owner(scene: S.Scene) -> np.ndarray:
    """``[256]`` index of the object owning each patch (most pixels, >= MIN_PATCH_PIXELS), -1 for background."""
    masks = S.object_masks(scene)
    per_patch = masks.reshape(len(scene.objects), S.GRID, S.PATCH, S.GRID, S.PATCH).sum(axis=(2, 4))
    per_patch = per_patch.reshape(len(scene.objects), NUM_PATCHES)
    owner = per_patch.argmax(0)
    return np.where(per_patch.max(0) >= MIN_PATCH_PIXELS, owner, -1)


def anchor_patch(obj: S.Obj) -> int:
    """The top-left patch of the 2x2 block an object covers (one patch per object: what counting reads)."""
    return ((obj.cy - S.PATCH // 2) // S.PATCH) * S.GRID + (obj.cx - S.PATCH // 2) // S.PATCH


def vision_targets(scene: S.Scene, owner: np.ndarray) -> dict[str, np.ndarray]:
    shape = np.zeros(NUM_PATCHES, dtype=np.int64)
    color = np.zeros(NUM_PATCHES, dtype=np.int64)
    centre = np.zeros(NUM_PATCHES, dtype=np.float32)
    for i, obj in enumerate(scene.objects):
        shape[owner == i] = 1 + S.SHAPES.index(obj.shape)
        color[owner == i] = 1 + S.COLOR_NAMES.index(obj.color)
        centre[anchor_patch(obj)] = 1.0
    present = np.zeros(len(S.COLOR_NAMES) * len(S.SHAPES), dtype=np.float32)
    for obj in scene.objects:
        present[S.COLOR_NAMES.index(obj.color) * len(S.SHAPES) + S.SHAPES.index(obj.shape)] = 1.0
    counts = np.array([scene.count(s) for s in S.SHAPES], dtype=np.int64)
    return {"shape": shape, "color": color, "centre": centre, "present": present, "counts": counts}


class VisionHeads(nn.Module):
    """Training-only heads on the tower: per-patch (shape, colour, centre, row, column) and CLS (pairs, counts)."""

    def __init__(self, width: int):
        super().__init__()
        self.patch_norm = nn.LayerNorm(width)
        self.patch = nn.Linear(width, 4 + 7 + 1 + 2 * S.GRID + 2)
        self.cls_norm = nn.LayerNorm(width)
        self.cls = nn.Linear(width, len(S.COLOR_NAMES) * len(S.SHAPES) + len(S.SHAPES) * 4)

    def loss(self, patches: torch.Tensor, cls: torch.Tensor, t: dict[str, torch.Tensor]):
        out = self.patch(self.patch_norm(patches))  # [B, 256, 44]
        B = out.shape[0]
        idx = torch.arange(NUM_PATCHES)
        rows, cols = (idx // S.GRID).expand(B, -1), (idx % S.GRID).expand(B, -1)
        shape_logits, color_logits = out[..., :4], out[..., 4:11]
        obj = t["shape"] > 0
        losses = {
            # where the objects are and their colour: 7-way per patch; shape: 3-way on object patches only
            "color": F.cross_entropy(color_logits.flatten(0, 1), t["color"].flatten(), weight=COLOR_WEIGHT),
            "shape": 2.0 * F.cross_entropy(shape_logits[..., 1:][obj], t["shape"][obj] - 1)
            if bool(obj.any())
            else shape_logits.sum() * 0,
            "centre": F.binary_cross_entropy_with_logits(out[..., 11], t["centre"], pos_weight=torch.tensor(20.0)),
            "rowcol": 0.3
            * (
                F.cross_entropy(out[..., 12:28].flatten(0, 1), rows.flatten())
                + F.cross_entropy(out[..., 28:44].flatten(0, 1), cols.flatten())
            )
            + 10
            * (
                F.mse_loss(out[..., 44], rows.float() / (S.GRID - 1))
                + F.mse_loss(out[..., 45], cols.float() / (S.GRID - 1))
            ),
        }
        c = self.cls(self.cls_norm(cls))
        n_pairs = len(S.COLOR_NAMES) * len(S.SHAPES)
        losses["cls"] = F.binary_cross_entropy_with_logits(c[:, :n_pairs], t["present"]) + F.cross_entropy(
            c[:, n_pairs:].reshape(-1, 4), t["counts"].flatten()
        )
        acc = {
            "shape_acc": (shape_logits[..., 1:].argmax(-1) + 1 == t["shape"])[obj].float().mean().item(),
            "color_acc": (color_logits.argmax(-1) == t["color"])[obj].float().mean().item(),
        }
        return losses, acc


# background patches outnumber object patches about 30:1; weigh object classes up
COLOR_WEIGHT = torch.tensor([0.2] + [1.0] * 6)


def tower_forward(model, pixels: torch.Tensor, cls_layer: int):
    """Run the CLIP tower; returns (patch features the LLaVA projector reads, CLS state after ``cls_layer``)."""
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    hs = out.hidden_states
    return hs[model.config.vision_feature_layer][:, 1:], hs[cls_layer + 1][:, 0]


# ----------------------------------------------------------------------------------------------------------
# Packed question segments


class Packer:
    """Token layout of one image + several question segments, and the attention mask that isolates segments."""

    def __init__(self, processor, questions: int):
        tok = processor.tokenizer
        self.tok = tok
        self.image_id = tok.convert_tokens_to_ids("<image>")
        prompt = processor.apply_chat_template(S.chat("__Q__"), add_generation_prompt=True)
        head, tail = prompt.split("__Q__")
        self.prefix = tok(head.replace("<image>", "<image>" * NUM_PATCHES), add_special_tokens=False)["input_ids"]
        if self.prefix.count(self.image_id) != NUM_PATCHES:
            raise ValueError(f"template prefix {head!r} does not hold one <image> token")
        self.tail = tok(tail, add_special_tokens=False)["input_ids"]  # "assistant :"
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id
        self.seg_len = 10 + len(self.tail) + 2  # longest question (10 tokens) + tail + answer + eos
        self.questions = questions
        self.length = len(self.prefix) + questions * self.seg_len
        self.image_start = self.prefix.index(self.image_id)

    def check_template(self, processor, question: str, answer: str) -> None:
        """The packed segment of ``question`` equals the tokens of the chat template with its answer."""
        conv = S.chat(question) + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        text = processor.apply_chat_template(conv).strip()
        ids = self.tok(text.replace("<image>", "<image>" * NUM_PATCHES), add_special_tokens=False)["input_ids"]
        q = self.tok(question, add_special_tokens=False)["input_ids"]
        a = self.tok(answer, add_special_tokens=False)["input_ids"]
        if ids != self.prefix + q + self.tail + a + [self.eos]:
            raise ValueError(f"packed layout does not match the chat template: {text!r}")

    def batch(self, items: list[list[tuple[S.Question, tuple[list, list]]]]):
        """``items[b]``: (question, [(shape word index in the question, target token positions), ...]) per
        segment of image b.

        Returns input ids, position ids, bool attention mask [B,1,T,T], answer query positions [B,Q],
        answer targets [B,Q], validity [B,Q], and the grounding rows (layer, head, query position, target
        distribution over the T positions, validity) [B,Q,GROUND_ROWS]."""
        B, Q, P, L = len(items), self.questions, len(self.prefix), self.seg_len
        T = self.length
        ids = torch.full((B, T), self.pad, dtype=torch.long)
        ids[:, :P] = torch.tensor(self.prefix)
        pos = torch.arange(T).repeat(B, 1)
        seg = torch.full((B, T), -1, dtype=torch.long)  # -1: prefix; -2: padding
        ans_q = torch.zeros(B, Q, dtype=torch.long)
        ans_t = torch.zeros(B, Q, dtype=torch.long)
        valid = torch.zeros(B, Q, dtype=torch.bool)
        R = GROUND_ROWS
        g_layer = torch.zeros(B, Q, R, dtype=torch.long)
        g_head = torch.zeros(B, Q, R, dtype=torch.long)
        g_q = torch.zeros(B, Q, R, dtype=torch.long)
        g_t = torch.zeros(B, Q, R, T)
        g_ok = torch.zeros(B, Q, R, dtype=torch.bool)
        r_q = torch.zeros(B, Q, 3, dtype=torch.long)
        r_color = torch.zeros(B, Q, 3, len(S.COLOR_NAMES))
        r_col = torch.full((B, Q, 3), -1.0)
        r_col2 = torch.full((B, Q, 3), -1.0)
        r_count = torch.zeros(B, Q, 3, dtype=torch.long)
        r_ok = torch.zeros(B, Q, 3, dtype=torch.bool)
        for b, segs in enumerate(items):
            for s in range(Q):
                start = P + s * L
                seg[b, start : start + L] = -2
                if s >= len(segs):
                    continue
                q, (targets, readouts) = segs[s]
                toks = self.tok(q.question, add_special_tokens=False)["input_ids"] + self.tail
                answer = self.tok.convert_tokens_to_ids(q.answer)
                full = toks + [answer, self.eos]
                ids[b, start : start + len(full)] = torch.tensor(full)
                pos[b, start : start + L] = torch.arange(P, P + L)
                seg[b, start : start + len(full)] = s
                ans_q[b, s] = start + len(toks) - 1
                ans_t[b, s] = answer
                valid[b, s] = True
                for r, (qpos, colors, column, count, column2) in enumerate(readouts):
                    r = 2 if qpos == ANSWER_POS else r
                    r_q[b, s, r] = start + len(toks) - 1 if qpos == ANSWER_POS else start + qpos - P
                    r_ok[b, s, r], r_col2[b, s, r] = True, column2
                    r_color[b, s, r] = torch.from_numpy(colors)
                    r_col[b, s, r], r_count[b, s, r] = column, count
                for r, (layer, head, qpos, target) in enumerate(targets):
                    g_layer[b, s, r], g_head[b, s, r], g_ok[b, s, r] = layer, head, True
                    g_q[b, s, r] = start + len(toks) - 1 if qpos == ANSWER_POS else start + qpos - P
                    for t_pos, w in target:
                        g_t[b, s, r, t_pos if t_pos < P else start + t_pos - P] += w
        qi, ki = seg.unsqueeze(2), seg.unsqueeze(1)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = causal & ((ki == -1) | (ki == qi)) & (ki != -2)
        mask |= torch.eye(T, dtype=torch.bool)  # padding rows attend to themselves (no NaN rows)
        return {
            "ids": ids,
            "pos": pos,
            "mask": mask.unsqueeze(1),
            "ans_q": ans_q,
            "ans_t": ans_t,
            "valid": valid,
            "g_layer": g_layer,
            "g_head": g_head,
            "g_q": g_q,
            "g_t": g_t,
            "g_ok": g_ok,
            "r_q": r_q,
            "r_color": r_color,
            "r_col": r_col,
            "r_col2": r_col2,
            "r_count": r_count,
            "r_ok": r_ok,
        }


GROUND_ROWS = 6
ANSWER_POS = -1


def grounding_targets(scene: S.Scene, q: S.Question, owner: np.ndarray, image_start: int, prefix_len: int):
    """The attention pattern that answers ``q``, as supervision rows (layer, head, query, target).

    Layer 0, at each shape word: head 0 spreads over the patches of every object of that shape (BOS when there
    is none); head 1 counts: mass n/(n+1) spread over the n anchor patches, 1/(n+1) on BOS. Layer 1, at the
    answer position: head 0 reads the (first) shape word, head 1 the second shape word (position), the colour
    word (exists) or the shape word again. Positions: prefix positions as they are, question words as
    ``prefix_len + word index`` (as in a one-question prompt), the answer position as ``ANSWER_POS``.

    Also returns read-out targets for each shape word (what its state after layer 0 should hold): the colour
    distribution of the objects of that shape, their mean centre x / image width (-1: none) and their number."""
    words = q.question.split()
    singular = {v: k for k, v in S.PLURALS.items()}
    rows = []
    readouts = []  # (shape word position, colour distribution of its objects, their mean x, count)
    shape_words = []
    for i, w in enumerate(words):
        shape = singular.get(w, w)
        if shape not in S.SHAPES:
            continue
        shape_words.append(i)
        objs = [j for j, o in enumerate(scene.objects) if o.shape == shape]
        patches = [image_start + int(p) for p in np.flatnonzero(np.isin(owner, objs))] if objs else []
        rows.append((0, 0, prefix_len + i, [(p, 1 / len(patches)) for p in patches] if patches else [(0, 1.0)]))
        n = len(objs)
        colors = np.zeros(len(S.COLOR_NAMES), dtype=np.float32)
        for j in objs:
            colors[S.COLOR_NAMES.index(scene.objects[j].color)] += 1 / n
        column = float(np.mean([scene.objects[j].cx for j in objs])) / S.IMAGE_SIZE if objs else -1.0
        readouts.append((prefix_len + i, colors, column, n, -1.0))
        anchors = [image_start + anchor_patch(scene.objects[j]) for j in objs]
        rows.append((0, 1, prefix_len + i, [(a, 1 / (n + 1)) for a in anchors] + [(0, 1 / (n + 1))]))
    first = shape_words[0]
    second = shape_words[1] if len(shape_words) > 1 else (3 if q.type == "exists" else first)
    rows.append((1, 0, ANSWER_POS, [(prefix_len + first, 1.0)]))
    rows.append((1, 1, ANSWER_POS, [(prefix_len + second, 1.0)]))
    # what the answer position should hold after layer 1: the read-outs of the shape word(s) it reads
    first_r = readouts[0]
    second_r = readouts[1] if len(readouts) > 1 else (None, None, -1.0, None)
    readouts.append((ANSWER_POS, first_r[1], first_r[2], first_r[3], second_r[2]))
    return rows, readouts


def lm_forward(model, feats: torch.Tensor, batch: dict, want_attn: bool):
    """Packed forward of the projector + Llama (stock modules, custom mask/positions).

    Returns answer logits [B,Q,V], eos logits [B,Q,V] and, with ``want_attn``, the log-attention of heads 0/1
    of layers 0 and 1 at the supervised query rows ``[2, B, Q*GROUND_ROWS, 2, T]`` together with the hidden
    states at the read-out rows (shape words after layer 0, answer position after layer 1)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    ids, pos, mask = batch["ids"], batch["pos"], batch["mask"]
    emb = lm.embed_tokens(ids)
    img = model.model.multi_modal_projector(feats)
    is_img = ids == model.config.image_token_index
    emb = emb.masked_scatter(is_img.unsqueeze(-1), img.to(emb.dtype))
    rope = lm.rotary_emb(emb, position_ids=pos)
    h = emb
    attn_logp = None
    B, Q = batch["ans_q"].shape
    for i, layer in enumerate(lm.layers):
        if want_attn and i in (0, 1):
            # heads 0 and 1 of this layer at the supervised query rows: log-attention [B, Q*R, 2, T]
            att = layer.self_attn
            hd = att.head_dim
            x = layer.input_layernorm(h)
            rows = batch["g_q"].reshape(B, -1)
            xr = torch.gather(x, 1, rows[..., None].expand(-1, -1, x.shape[-1]))
            q = F.linear(xr, att.q_proj.weight[: 2 * hd]).view(B, -1, 2, hd).transpose(1, 2)  # [B,2,N,hd]
            k = F.linear(x, att.k_proj.weight[: 2 * hd]).view(B, -1, 2, hd).transpose(1, 2)  # [B,2,T,hd]
            cos, sin = rope
            cr = torch.gather(cos, 1, rows[..., None].expand(-1, -1, cos.shape[-1]))
            sr = torch.gather(sin, 1, rows[..., None].expand(-1, -1, sin.shape[-1]))
            q, _ = apply_rotary_pos_emb(q, q, cr, sr)
            k, _ = apply_rotary_pos_emb(k, k, cos, sin)
            logits = (q @ k.transpose(-1, -2)).float() * att.scaling  # [B,2,N,T]
            m = torch.gather(mask[:, 0], 1, rows[..., None].expand(-1, -1, mask.shape[-1]))  # [B,N,T]
            logp = logits.masked_fill(~m[:, None], -1e9).log_softmax(-1).transpose(1, 2)  # [B,N,2,T]
            attn_logp = logp if attn_logp is None else torch.stack([attn_logp, logp])  # [layer,B,N,2,T]
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope)
        if want_attn and i == 0:  # shape words after layer 0
            rq = batch["r_q"][..., :2].reshape(B, -1)
            readout_h = [torch.gather(h, 1, rq[..., None].expand(-1, -1, h.shape[-1]))]  # [B, Q*2, H]
        if want_attn and i == 1:  # answer position after layer 1
            rq = batch["r_q"][..., 2]
            readout_h.append(torch.gather(h, 1, rq[..., None].expand(-1, -1, h.shape[-1])))  # [B, Q, H]
    h = lm.norm(h)
    rows = batch["ans_q"]
    hq = torch.gather(h, 1, rows[..., None].expand(B, Q, h.shape[-1]))
    he = torch.gather(h, 1, (rows + 1)[..., None].expand(B, Q, h.shape[-1]))
    if want_attn:
        return model.lm_head(hq), model.lm_head(he), (attn_logp, readout_h)
    return model.lm_head(hq), model.lm_head(he), None


# ----------------------------------------------------------------------------------------------------------
# Training


def lr_factor(step: int, frac: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, cosine decay over the stage's progress ``frac`` (0..1)."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


class Progress:
    """How far a stage is (0..1): the further along of its step count and its wall-clock budget, so a run on a
    loaded machine ends on time with a fully decayed schedule (it then takes fewer steps)."""

    def __init__(self, steps: int, budget_s: float | None):
        self.steps, self.budget, self.t0 = steps, budget_s, time.time()

    def __call__(self, step: int) -> float:
        by_time = (time.time() - self.t0) / self.budget if self.budget else 0.0
        return max(step / self.steps, by_time)


class SceneStream:
    """Train-split scenes in index order (seeded), rendered, with patch ownership."""

    def __init__(self, seed: int, start: int = 0):
        self.seed, self.index = seed, start

    def next(self):
        scene, image = S.sample(self.seed, "train", self.index)
        rng = np.random.default_rng([self.seed, S.SPLITS["train"], self.index, 1])
        self.index += 1
        return scene, image, patch_owner(scene), rng


def train_vision(model, heads, stream, args, log):
    params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.01, betas=(0.9, 0.98))
    cls_layer = cls_layer_index(model)
    t0 = time.time()
    progress = Progress(args.vision_steps, args.max_minutes * 60 * args.vision_share if args.max_minutes else None)
    step = 0
    while (frac := progress(step)) < 1:
        scenes = [stream.next() for _ in range(args.vision_batch)]
        pixels = pixel_batch([s[1] for s in scenes])
        tg = [vision_targets(s[0], s[2]) for s in scenes]
        t = {k: torch.from_numpy(np.stack([x[k] for x in tg])) for k in tg[0]}
        for g in opt.param_groups:
            g["lr"] = args.vision_lr * lr_factor(step, frac, args.warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
            feats, cls = tower_forward(model, pixels, cls_layer)
        losses, acc = heads.loss(feats.float(), cls.float(), t)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0:
            log(
                f"vision {step:5d} {time.time() - t0:7.1f}s loss {loss.item():.3f} "
                + " ".join(f"{k} {v.item():.3f}" for k, v in losses.items())
                + " "
                + " ".join(f"{k} {v:.3f}" for k, v in acc.items())
            )
        step += 1
    log(f"vision stage: {step} steps")
    return step


def cls_layer_index(model) -> int:
    """The vision layer whose CLS row the ``cls`` pruning method reads by default (2L//3 of L layers)."""
    return 2 * model.config.vision_config.num_hidden_layers // 3


def make_segments(scene, owner, rng, packer, n: int):
    """``n`` random questions about ``scene`` (types uniform among those the scene allows; count answers
    uniform where the scene allows) with their grounding targets."""
    allowed = [t for t, opts in S.askable(scene).items() if opts]
    segs = []
    for _ in range(n):
        qtype = allowed[int(rng.integers(len(allowed)))]
        target = S.COUNT_WORDS[int(rng.integers(4))] if qtype == "count" else None
        q = S.ask(scene, qtype, rng, target)
        segs.append((q, grounding_targets(scene, q, owner, packer.image_start, len(packer.prefix))))
    return segs


def train_language(model, packer, stream, args, log, test_probe, readout, budget_s):
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    model.model.vision_tower.eval()
    params = (
        list(model.model.multi_modal_projector.parameters())
        + list(model.model.language_model.parameters())
        + list(model.lm_head.parameters())
    )
    opt = torch.optim.AdamW(params + list(readout.parameters()), lr=args.lm_lr, weight_decay=0.0, betas=(0.9, 0.98))
    t0 = time.time()
    run_acc = []
    progress = Progress(args.lm_steps, budget_s)
    step = 0
    while (frac := progress(step)) < 1:
        scenes = [stream.next() for _ in range(args.lm_batch)]
        items = [make_segments(sc, owner, rng, packer, args.questions) for sc, _, owner, rng in scenes]
        batch = packer.batch(items)
        for g in opt.param_groups:
            g["lr"] = args.lm_lr * lr_factor(step, frac, args.warmup)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
            feats = model.model.vision_tower(pixel_batch([s[1] for s in scenes]), output_hidden_states=True)
            feats = feats.hidden_states[model.config.vision_feature_layer][:, 1:].float()
        want_attn = args.attn_weight > 0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
            ans_logits, eos_logits, attn_logp = lm_forward(model, feats, batch, want_attn)
        v = batch["valid"]
        ans_loss = F.cross_entropy(ans_logits.float()[v], batch["ans_t"][v])
        eos_loss = F.cross_entropy(eos_logits.float()[v], torch.full_like(batch["ans_t"][v], packer.eos))
        loss = ans_loss + 0.2 * eos_loss
        ground_loss = torch.zeros(())
        if want_attn:
            words_h, answer_h = attn_logp[1]
            ground_loss = (
                grounding_loss(attn_logp[0], batch)
                + readout_loss(readout[0], words_h, batch, slice(0, 2))
                + readout_loss(readout[1], answer_h, batch, slice(2, 3))
            )
            loss = loss + args.attn_weight * cosine_decay(frac, args.attn_keep) * ground_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run_acc.append((ans_logits.argmax(-1)[v] == batch["ans_t"][v]).float().mean().item())
        if step % args.log_every == 0:
            acc = float(np.mean(run_acc[-args.log_every :]))
            log(
                f"lm {step:5d} {time.time() - t0:7.1f}s loss {ans_loss.item():.3f} eos {eos_loss.item():.3f} "
                f"ground {ground_loss.item():.3f} train_acc {acc:.3f}"
            )
        if args.probe_every and (step + 1) % args.probe_every == 0:
            log(f"lm {step:5d} probe " + test_probe())
        step += 1
    log(f"language stage: {step} steps")
    return step


class Readout(nn.Module):
    """Training-only linear read-out of a shape word's state after LM layer 0: colours, mean x, count."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, len(S.COLOR_NAMES) + 1 + 4 + 1)


def readout_loss(readout: Readout, hidden: torch.Tensor, batch: dict, rows: slice) -> torch.Tensor:
    B = hidden.shape[0]
    batch = {k: batch[k][:, :, rows] for k in ("r_ok", "r_color", "r_col", "r_col2", "r_count")}
    ok = batch["r_ok"].reshape(B, -1)
    out = readout.out(readout.norm(hidden.float()))[ok]
    nc = len(S.COLOR_NAMES)
    colors = batch["r_color"].reshape(B, -1, nc)[ok]
    has = colors.sum(-1) > 0
    x = batch["r_col"].reshape(B, -1)[ok]  # mean centre x / image width; -1: no object
    loss = 10 * F.mse_loss(out[x >= 0, nc], x[x >= 0]) if bool((x >= 0).any()) else out.sum() * 0
    loss = loss + F.cross_entropy(out[:, nc + 1 : nc + 5], batch["r_count"].reshape(B, -1)[ok])
    x2 = batch["r_col2"].reshape(B, -1)[ok]  # second shape of a position question
    if bool((x2 >= 0).any()):
        loss = loss + 10 * F.mse_loss(out[x2 >= 0, nc + 5], x2[x2 >= 0])
    if bool(has.any()):
        loss = loss + -(colors[has] * out[has, :nc].log_softmax(-1)).sum(-1).mean()
    return loss


def grounding_loss(attn_logp: torch.Tensor, batch: dict) -> torch.Tensor:
    """KL(target || attention) averaged over the supervised rows."""
    B = attn_logp.shape[1]
    lay, head, ok = (batch[k].reshape(B, -1) for k in ("g_layer", "g_head", "g_ok"))
    t = batch["g_t"].reshape(B, lay.shape[1], -1)
    b_idx = torch.arange(B)[:, None].expand_as(lay)
    n_idx = torch.arange(lay.shape[1])[None].expand_as(lay)
    lp = attn_logp[lay, b_idx, n_idx, head]  # [B,N,T]
    kl = (t * (torch.log(t.clamp_min(1e-9)) - lp)).sum(-1)
    return kl[ok].mean()


def cosine_decay(frac: float, keep: float) -> float:
    """Weight of the grounding loss: 1 for the first ``keep`` of the stage, then cosine to 0."""
    return 1.0 if frac < keep else 0.5 * (1 + math.cos(math.pi * (frac - keep) / max(1e-6, 1 - keep)))


def packed_probe(model, packer, rows, root: Path, args):
    """Accuracy per type on test rows through the packed route (fast; the final number uses generate)."""
    from PIL import Image

    model.eval()
    by_image: dict[str, list] = {}
    for r in rows:
        by_image.setdefault(r["image"], []).append(r)
    correct = {t: [] for t in S.QUESTION_TYPES}
    keys = list(by_image)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
        for i in range(0, len(keys), 16):
            chunk = keys[i : i + 16]
            imgs = [Image.open(root / k).convert("RGB") for k in chunk]
            feats = model.model.vision_tower(pixel_batch(imgs), output_hidden_states=True)
            feats = feats.hidden_states[model.config.vision_feature_layer][:, 1:].float()
            items = [
                [(S.Question(r["type"], r["question"], r["answer"]), ([], [])) for r in by_image[k]] for k in chunk
            ]
            batch = packer.batch(items)
            logits, _, _ = lm_forward(model, feats, batch, False)
            pred = logits.argmax(-1)
            for b, k in enumerate(chunk):
                for s, r in enumerate(by_image[k]):
                    correct[r["type"]].append(int(pred[b, s]) == packer.tok.convert_tokens_to_ids(r["answer"]))
    model.train()
    model.model.vision_tower.eval()
    allc = sum(correct.values(), [])
    return f"all {np.mean(allc):.3f} " + " ".join(f"{t} {np.mean(c):.3f}" for t, c in correct.items())


# ----------------------------------------------------------------------------------------------------------


def write_card(out: Path, info: dict, model) -> None:
    """The model card (README.md) from the measured training run and test result."""
    vc, tc = model.config.vision_config, model.config.text_config
    test = info["test"]
    per_type = "\n".join(
        f"| {t} | {test['per_type'][t] * 100:.1f}% | {test['per_type_n'][t]} |" for t in test["per_type"]
    )
    cmd = "python eval/train_tiny.py " + " ".join(info["argv"])
    text = f"""---
library_name: transformers
pipeline_tag: image-text-to-text
license: apache-2.0
---

# tiny-llava-shapes

A {info["parameters"] / 1e6:.2f} M-parameter `LlavaForConditionalGeneration` trained from scratch on CPU on the
synthetic shapes benchmark of vtprune (`vtprune/shapes.py`, task `eval/tasks/vtprune_shapes`). It exists so
that visual-token pruning can be measured end to end without downloads or a GPU: it answers the benchmark's
questions well only when it sees the patches of the objects asked about.

**Not a general VLM**: it knows 3 shapes, 6 colours and 4 question templates, nothing else.

## Architecture (stock Hugging Face classes)

- Vision: `CLIPVisionModel`, {vc.num_hidden_layers} layers, width {vc.hidden_size}, {vc.num_attention_heads} heads,
  224x224 input, 14-pixel patches: 256 patch tokens + CLS; the LM reads the last layer
  (`vision_feature_layer={model.config.vision_feature_layer}`, `vision_feature_select_strategy="default"`: CLS dropped).
- Projector: LLaVA 2-layer MLP (GELU).
- Language model: `LlamaForCausalLM`-style decoder, {tc.num_hidden_layers} layers, width {tc.hidden_size},
  {tc.num_attention_heads} heads, MLP {tc.intermediate_size}, RoPE; vocabulary of {tc.vocab_size} words.
- Tokenizer: word-level (`tokenizers` WordLevel, lower-casing, punctuation split); chat template
  `<s>user : <image> QUESTION assistant : ANSWER </s>`; `generation_config` greedy, stops at `</s>`.
- Weights: fp32 safetensors.

Use it like any LLaVA:

```python
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
processor = AutoProcessor.from_pretrained("models/tiny-llava-shapes")
model = LlavaForConditionalGeneration.from_pretrained("models/tiny-llava-shapes")
conv = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "what color is the circle ?"}}]}}]
prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
inputs = processor(images=Image.open("eval/tasks/vtprune_shapes/images/test_00000.png"), text=prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=4)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

## Test accuracy

Exact match of the first generated word on the 600 questions of `eval/tasks/vtprune_shapes/test.jsonl`
(seed 1234; 150 per type), through `AutoProcessor` + `generate` one question at a time
(`python eval/train_tiny.py --eval-only`):

| type | accuracy | questions |
|---|---|---|
{per_type}
| **all** | **{test["accuracy"] * 100:.1f}%** | {test["n"]} |

Chance: about 17% (color), 25% (count), 50% (exists), 50% (position).

## Training recipe (`eval/train_tiny.py`, seed {info["args"]["seed"]})

Command (from the repository root):

    {cmd}

Data: fresh scenes of the benchmark's `train` split (seed {info["args"]["seed"]}; the test split uses seed 1234
and another stream), {info["train_images"]} images in all, each asked several random questions.

1. Vision stage ({info["args"]["vision_steps"]} steps, batch {info["args"]["vision_batch"]}, AdamW lr {info["args"]["vision_lr"]}, warm-up + cosine):
   the CLIP tower learns dense targets from the generator's ground truth through training-only linear heads:
   per patch the colour (or background) and shape of the object covering it, whether it is an object's
   top-left (anchor) patch, its row and column; from the CLS token of layer {2 * vc.num_hidden_layers // 3} (the layer the `cls`
   pruning method reads by default) which (colour, shape) pairs the scene holds and how many of each shape.
2. Language stage ({info["args"]["lm_steps"]} steps, batch {info["args"]["lm_batch"]} images x {info["args"]["questions"]} questions, AdamW lr {info["args"]["lm_lr"]}): tower frozen;
   projector + LM trained on packed sequences (one image prefix, then {info["args"]["questions"]} question/answer segments,
   each attending only to the prefix and itself, at the positions of a one-question prompt). Loss:
   cross-entropy on the answer word and on `</s>` after it, plus a grounding loss (weight {info["args"]["attn_weight"]}, decaying
   to 0 over the last {1 - info["args"]["attn_keep"]:.0%} of the steps): KL between the attention of two heads and the generator's
   ground truth. Layer 0 at each shape word: head 0 over the patches of the objects of that shape, head 1
   over their anchor patches plus BOS in proportion n:1 (a count read-out); layer 1 at the answer position:
   heads 0/1 on the shape word(s) (and the colour word of existence questions). Training-only linear
   read-outs of the shape words' states after layer 0 and of the answer position after layer 1 predict the
   colours, mean x and number of the objects of the named shape(s).

Each stage stops at its step count or at its share of `--max-minutes` of wall clock, whichever comes
first; this run took {info["vision_steps_done"]} vision and {info["lm_steps_done"]} language steps.

The training-only heads are not saved; the checkpoint is a plain LLaVA. Because of the auxiliary losses, the
CLS token of the tower attends to the objects (as in CLIP models trained on captions) and the LM's early layers
attend to the object patches named in the question, so CLS- and LM-attention-based pruning have a real signal.

Training time: {info["train_seconds"] / 60:.1f} min wall clock ({info["vision_seconds"] / 60:.1f} min vision stage),
{info["cpu_seconds"] / 60:.1f} min of process CPU time, `torch.set_num_threads({info["args"]["threads"]})`, bf16 autocast
{"on" if info["args"]["bf16"] else "off"}, on a 2-core Xeon machine shared with other jobs (wall time depends on the load).
Trained on {info["date"]}.
"""
    (out / "README.md").write_text(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "models" / "tiny-llava-shapes"))
    p.add_argument("--test", default=str(ROOT / "eval" / "tasks" / "vtprune_shapes" / "test.jsonl"))
    p.add_argument("--eval-only", action="store_true", help="only score the saved model (generate route)")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N test questions")
    p.add_argument(
        "--prune",
        nargs="*",
        default=[],
        metavar="METHOD:KEEP",
        help="with --eval-only: also score under vtprune.patched(model, METHOD, keep=KEEP)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vision-width", type=int, default=64)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--text-width", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=3)
    p.add_argument("--vision-steps", type=int, default=400)
    p.add_argument("--vision-batch", type=int, default=16)
    p.add_argument("--vision-lr", type=float, default=3e-3)
    p.add_argument("--lm-steps", type=int, default=4000)
    p.add_argument("--lm-batch", type=int, default=4)
    p.add_argument("--questions", type=int, default=24, help="question segments packed per image")
    p.add_argument("--lm-lr", type=float, default=2e-3)
    p.add_argument("--attn-weight", type=float, default=1.0, help="grounding loss weight (0: off)")
    p.add_argument("--attn-keep", type=float, default=0.5, help="fraction of LM steps at full grounding weight")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--bf16", type=int, default=1, help="bf16 autocast for the matmuls (1/0)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--probe-every", type=int, default=250)
    p.add_argument("--probe-rows", type=int, default=300)
    p.add_argument(
        "--max-minutes",
        type=float,
        default=55,
        help="wall-clock budget of the training; each stage ends at its step count or its time share",
    )
    p.add_argument("--vision-share", type=float, default=0.3, help="share of --max-minutes for the vision stage")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--save-vision", default=None, help="pilot runs: save the tower after the vision stage")
    p.add_argument("--vision-init", default=None, help="pilot runs: skip the vision stage, load this tower")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    if args.eval_only:
        specs = [spec.partition(":")[::2] for spec in args.prune]
        for spec, (method, keep) in zip(args.prune, specs):
            if not method or not keep.isdigit():
                raise ValueError(f"--prune takes METHOD:KEEP (e.g. cls:13), got {spec!r}")
        result = S.evaluate(out, args.test, limit=args.eval_limit, log=log)
        log(json.dumps(result))
        for method, keep in specs:
            pruned = S.evaluate(out, args.test, limit=args.eval_limit, prune=(method, int(keep)))
            log(f"{method} keep={keep}: " + json.dumps(pruned))
        return result

    processor = S.build_processor()
    model = build_model(processor, args)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"parameters: {n_params / 1e6:.2f} M ({n_params * 4 / 2**20:.1f} MiB fp32)")
    heads = VisionHeads(args.vision_width)
    packer = Packer(processor, args.questions)
    packer.check_template(processor, "is the circle left or right of the square ?", "left")
    stream = SceneStream(args.seed)
    test_rows = S.load_split(args.test)[: args.probe_rows]
    test_root = Path(args.test).parent

    t0, c0 = time.time(), time.process_time()
    model.train()
    if args.vision_init:  # pilot runs: reuse a tower from --save-vision (not for the shipped model)
        model.model.vision_tower.load_state_dict(torch.load(args.vision_init))
        stream.index = args.vision_steps * args.vision_batch
        vision_steps = 0
    else:
        vision_steps = train_vision(model, heads, stream, args, log)
    if args.save_vision:
        torch.save(model.model.vision_tower.state_dict(), args.save_vision)
    t_vision = time.time() - t0
    log(f"vision stage: {t_vision:.0f} s")
    readout = nn.ModuleList([Readout(args.text_width), Readout(args.text_width)])
    probe = lambda: packed_probe(model, packer, test_rows, test_root, args)  # noqa: E731
    lm_budget = args.max_minutes * 60 - (time.time() - t0) if args.max_minutes else None
    lm_steps = train_language(model, packer, stream, args, log, probe, readout, lm_budget)
    t_train = time.time() - t0
    cpu_train = time.process_time() - c0
    log(
        f"training: {t_train:.0f} s ({t_vision:.0f} s vision + {t_train - t_vision:.0f} s language), "
        f"{stream.index} training images; process CPU time {cpu_train:.0f} s"
    )
    if args.no_save:
        log("probe " + packed_probe(model, packer, S.load_split(args.test), test_root, args))
        return None
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    info = {
        "vision_steps_done": vision_steps,
        "lm_steps_done": lm_steps,
        "train_seconds": round(t_train),
        "vision_seconds": round(t_vision),
        "train_images": stream.index,
        "parameters": n_params,
        "argv": sys.argv[1:],
        "args": vars(args),
    }
    (out / "training_log.txt").write_text("\n".join(log_lines) + "\n")
    result = S.evaluate(out, args.test, limit=args.eval_limit, log=log)
    info["test"] = result
    info["cpu_seconds"] = round(cpu_train)
    info["date"] = time.strftime("%Y-%m-%d")
    write_card(out, info, model)
    (out / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    log(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
