"""Independent PyTorch reference of Qwen-VL-Chat + ID-Former, written from SPEC §1 in the style of the
original modeling code (sequence-first ViT, torch.nn.MultiheadAttention in the resampler, roles derived
from the token ids here, not taken from the Rust side). The Rust parity test runs it with the project's
venv python:

  python qwenvl_ref.py CONFIG.json WEIGHTS.safetensors INPUTS.safetensors OUT.safetensors

INPUTS holds input_ids (B,S) int64, labels (B,S) int64, pixels (N,3,H,W) f32. OUT gets logits (B,S,V) and
loss (scalar), both f32.
"""
import json, math, sys
import torch, torch.nn as nn, torch.nn.functional as F
from safetensors.torch import load_file, save_file

IMG_START, IMG_END, IS_TOKEN = 151857, 151858, 374


def get_abs_pos(abs_pos, tgt_size):
    src = int(math.sqrt(abs_pos.size(0)))
    tgt = int(math.sqrt(tgt_size))
    if src == tgt:
        return abs_pos
    return F.interpolate(abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2), size=(tgt, tgt),
                         mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2).to(abs_pos.dtype)


class Ref:
    def __init__(self, cfg, w):
        self.c, self.w = cfg, w
        d = cfg["hidden_size"]
        self.heads_r = max(d // 128, 1)
        def mha(prefix):
            m = nn.MultiheadAttention(d, self.heads_r)
            m.load_state_dict({"in_proj_weight": w[prefix + ".in_proj_weight"], "in_proj_bias": w[prefix + ".in_proj_bias"],
                               "out_proj.weight": w[prefix + ".out_proj.weight"], "out_proj.bias": w[prefix + ".out_proj.bias"]})
            return m
        self.attn = mha("transformer.visual.attn_pool.attn")
        self.attn1 = mha("transformer.visual.attn_pool.attn1") if "transformer.visual.attn_pool.attn1.in_proj_weight" in w else None

    def ln(self, x, p, eps=1e-6):
        return F.layer_norm(x, (x.shape[-1],), self.w[p + ".weight"], self.w[p + ".bias"], eps)

    def vit(self, pixels):
        w, v = self.w, self.c["visual"]
        x = F.conv2d(pixels, w["transformer.visual.conv1.weight"], stride=v["patch_size"])
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = x + get_abs_pos(w["transformer.visual.positional_embedding"], x.size(1))
        x = self.ln(x, "transformer.visual.ln_pre")
        x = x.permute(1, 0, 2)  # L, N, D as the original
        H = v["heads"]
        for i in range(v["layers"]):
            p = f"transformer.visual.transformer.resblocks.{i}"
            h = self.ln(x, p + ".ln_1")
            L, N, D = h.shape
            hd = D // H
            mixed = F.linear(h, w[p + ".attn.in_proj.weight"], w[p + ".attn.in_proj.bias"])
            mixed = mixed.view(L, N, H, 3 * hd)
            q, k, vv = mixed.split(hd, dim=-1)
            q = q.reshape(L, N * H, hd).transpose(0, 1)
            k = k.reshape(L, N * H, hd).transpose(0, 1)
            vv = vv.reshape(L, N * H, hd).transpose(0, 1)
            att = torch.softmax(torch.bmm(q / math.sqrt(hd), k.transpose(1, 2)), -1)
            ctx = torch.bmm(att, vv).transpose(0, 1).reshape(L, N, D)
            x = x + F.linear(ctx, w[p + ".attn.out_proj.weight"], w[p + ".attn.out_proj.bias"])
            h = self.ln(x, p + ".ln_2")
            h = F.gelu(F.linear(h, w[p + ".mlp.c_fc.weight"], w[p + ".mlp.c_fc.bias"]))
            x = x + F.linear(h, w[p + ".mlp.c_proj.weight"], w[p + ".mlp.c_proj.bias"])
        return x.permute(1, 0, 2)

    def pool(self, h, pos_k):  # h: N, P, D
        w = self.w
        q = self.ln(w["transformer.visual.attn_pool.query"], "transformer.visual.attn_pool.ln_q")
        N = h.shape[0]
        qq = q.unsqueeze(1).repeat(1, N, 1) + w["transformer.visual.attn_pool.pos_embed"].unsqueeze(1)
        kv = h.permute(1, 0, 2)
        out = self.attn(qq, kv + pos_k.unsqueeze(1), kv, need_weights=False)[0]
        return out.permute(1, 0, 2)

    def visual(self, pixels, rows, roles):
        w = self.w
        feats = self.vit(pixels)
        x = self.ln(F.linear(feats, w["transformer.visual.attn_pool.kv_proj.weight"]), "transformer.visual.attn_pool.ln_kv")
        pos_k = get_abs_pos(w["transformer.visual.attn_pool.pos_embed"], x.size(1))
        outs = [None] * x.shape[0]
        for i in range(x.shape[0]):
            if roles[i] != "test" or self.attn1 is None:
                outs[i] = self.pool(x[i:i + 1], pos_k)[0]
        for i in range(x.shape[0]):
            if roles[i] == "test" and self.attn1 is not None:
                mem = torch.cat([outs[j] for j in range(x.shape[0]) if rows[j] == rows[i] and roles[j] == "ref"], 0).detach()
                xt = x[i:i + 1]
                hq = (xt + pos_k).permute(1, 0, 2)
                m = mem.unsqueeze(1)
                h = self.attn1(hq, m, m, need_weights=False)[0].permute(1, 0, 2) + xt
                outs[i] = self.pool(h, pos_k)[0]
        out = torch.stack(outs)
        out = self.ln(out, "transformer.visual.ln_post")
        return out @ w["transformer.visual.proj"]

    def rms(self, x, p):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * self.w[p]

    def forward(self, ids, labels, pixels):
        w, c = self.w, self.c
        B, S = ids.shape
        # image spans and roles, from the ids
        rows, starts, roles = [], [], []
        for b in range(B):
            row_imgs = [s for s in range(S) if ids[b, s].item() == IMG_START]
            is_ref = [s >= 2 and ids[b, s - 2].item() == IS_TOKEN for s in row_imgs]
            for s, r in zip(row_imgs, is_ref):
                rows.append(b); starts.append(s)
                roles.append("ref" if r else ("test" if is_ref and is_ref[0] else "general"))
        x = F.embedding(ids, w["transformer.wte.weight"])
        if rows:
            vis = self.visual(pixels, rows, roles)
            x = x.clone()
            for n, (b, s) in enumerate(zip(rows, starts)):
                x[b, s + 1:s + 257] = vis[n]
        D, H = c["hidden_size"], c["num_attention_heads"]
        hd = c["kv_channels"]
        inv_freq = 1.0 / (c.get("rotary_emb_base", 10000) ** (torch.arange(0, hd, 2).float() / hd))
        t = torch.arange(S).float()
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
        def rot(t):
            t1, t2 = t.float().chunk(2, -1)
            return ((t.float() * cos) + (torch.cat((-t2, t1), -1) * sin)).type_as(t)
        mask = torch.full((S, S), float("-inf")).triu(1)
        for i in range(c["num_hidden_layers"]):
            p = f"transformer.h.{i}"
            h = self.rms(x, p + ".ln_1.weight")
            qkv = F.linear(h, w[p + ".attn.c_attn.weight"], w[p + ".attn.c_attn.bias"])
            q, k, v = qkv.split(D, 2)
            q, k, v = (z.view(B, S, H, hd) for z in (q, k, v))
            q, k = rot(q), rot(k)
            q, k, v = (z.permute(0, 2, 1, 3) for z in (q, k, v))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1)
            a = (att @ v).permute(0, 2, 1, 3).reshape(B, S, D)
            x = x + F.linear(a, w[p + ".attn.c_proj.weight"])
            h = self.rms(x, p + ".ln_2.weight")
            a1 = F.linear(h, w[p + ".mlp.w1.weight"]); a2 = F.linear(h, w[p + ".mlp.w2.weight"])
            x = x + F.linear(a1 * F.silu(a2), w[p + ".mlp.c_proj.weight"])
        logits = F.linear(self.rms(x, "transformer.ln_f.weight"), w["lm_head.weight"])
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
        return logits.float(), loss.float()


def main():
    cfg = json.load(open(sys.argv[1]))
    w = load_file(sys.argv[2])
    w = {k: v.float() for k, v in w.items()}
    inp = load_file(sys.argv[3])
    torch.set_grad_enabled(False)
    logits, loss = Ref(cfg, w).forward(inp["input_ids"], inp["labels"], inp["pixels"].float())
    save_file({"logits": logits.contiguous(), "loss": loss.reshape(1)}, sys.argv[4])


if __name__ == "__main__":
    main()
