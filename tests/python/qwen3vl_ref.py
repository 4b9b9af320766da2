"""transformers' own Qwen3-VL as the oracle of idavlm's Qwen3-VL family (SPEC-QWEN3VL.md).

  python qwen3vl_ref.py make DIR [--untied]
      A tiny random Qwen3VLForConditionalGeneration (GQA, q_proj wider than hidden, a ViT head size of 24,
      DeepStack indexes inside the 4-block ViT) saved with save_pretrained into DIR.
  python qwen3vl_ref.py run DIR INPUTS.safetensors OUT.safetensors
      Loads DIR, runs the forward in f32 with eager attention on INPUTS (input_ids, labels (B,S) int64,
      pixel_values (N,1536) f32, image_grid_thw (N,3) int64), backward of the loss. OUT gets logits,
      loss, position_ids (3,B,S) from the model's own get_rope_index, and grad.NAME of every parameter.
  python qwen3vl_ref.py logits DIR INPUTS.safetensors OUT.safetensors
      The same forward only (a checkpoint written by idavlm, read by from_pretrained).
  python qwen3vl_ref.py images DIR MIN_PIXELS MAX_PIXELS WxH...
      Writes a seeded random PNG per size (smooth gradients plus noise) into DIR and runs transformers'
      Qwen2VLImageProcessorPil with Qwen3-VL's preprocessor values on each: DIR/N.safetensors gets
      pixel_values and image_grid_thw.
"""
import sys
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

IMAGE_PAD = 151655


def make(out, tied):
    cfg = Qwen3VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
            max_position_embeddings=4096,
            rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[6, 5, 5], mrope_interleaved=True),
        ),
        vision_config=dict(
            depth=4, hidden_size=72, intermediate_size=112, num_heads=3, patch_size=16, temporal_patch_size=2,
            spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 3],
        ),
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    m = Qwen3VLForConditionalGeneration(cfg).float()
    # HF's init leaves norms at one and biases at zero; perturb every tensor so each path is visible.
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(out)


def load(d):
    m = Qwen3VLForConditionalGeneration.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    m.train(False)
    return m


def forward(m, inp):
    ids, grid = inp["input_ids"], inp["image_grid_thw"]
    mm = (ids == IMAGE_PAD).long()
    pos, _ = m.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=torch.ones_like(ids))
    out = m(input_ids=ids, pixel_values=inp["pixel_values"], image_grid_thw=grid, mm_token_type_ids=mm,
            position_ids=pos, labels=inp.get("labels"))
    return out, pos


def images(d, min_pixels, max_pixels, sizes):
    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    p = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3, size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    rng = np.random.default_rng(5)
    for n, wh in enumerate(sizes):
        w, h = map(int, wh.split("x"))
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 256], -1)
        img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype("uint8")
        path = f"{d}/{n}.png"
        Image.fromarray(img).save(path)
        o = p(images=[Image.open(path).convert("RGB")], return_tensors="pt")
        save_file({"pixel_values": o["pixel_values"].float().contiguous(), "image_grid_thw": o["image_grid_thw"].long()},
                  f"{d}/{n}.safetensors")


def main():
    cmd = sys.argv[1]
    if cmd == "images":
        images(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
        return
    if cmd == "make":
        make(sys.argv[2], tied="--untied" not in sys.argv)
        return
    d, inputs, outp = sys.argv[2:5]
    inp = load_file(inputs)
    m = load(d)
    res = {}
    if cmd == "logits":
        with torch.no_grad():
            out, pos = forward(m, inp)
    else:
        out, pos = forward(m, inp)
        out.loss.backward()
        for n, p in m.named_parameters():
            if p.grad is not None:
                res["grad." + n] = p.grad.contiguous()
        res["loss"] = out.loss.detach().reshape(1)
    res["logits"] = out.logits.detach().contiguous()
    res["position_ids"] = pos.contiguous()
    save_file(res, outp)


if __name__ == "__main__":
    main()
