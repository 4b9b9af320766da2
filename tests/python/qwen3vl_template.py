"""Oracle of the Qwen3-VL template over IDA-VLM conversations, independent of idavlm's Rust code:
the conversation rendered as the Qwen3-VL chat template's text (SPEC-QWEN3VL.md §4: ChatML, no default
system prompt, each image `<|vision_start|><|image_pad|><|vision_end|>`), tokenised by tiktoken over
qwen.tiktoken with Qwen3-VL's special tokens (§14.1), each `<|image_pad|>` expanded to the image's token
count (the processor's `replace_image_token`), labels by the Qwen3-VL fine-tuning rule with the fix of
QwenLM/Qwen3-VL PR #2027 (a span starts at `<|im_start|>assistant\\n`, runs through `<|im_end|>\\n`).

  python qwen3vl_template.py TIKTOKEN IN.json OUT.json
IN: {"min_pixels", "max_pixels", "items": [{"conversations": [{"from", "value"}], "image_sizes": [[w, h], ...]}]};
OUT: [{"input_ids", "labels"}]. Token counts per image from transformers' own smart_resize.
"""
import base64, json, re, sys
import tiktoken

PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
            "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
            "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
            "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
            "<think>", "</think>"]


def main():
    ranks = {}
    for line in open(sys.argv[1], "rb"):
        if line.strip():
            tok, r = line.split()
            ranks[base64.b64decode(tok)] = int(r)
    enc = tiktoken.Encoding("qwen3vl", pat_str=PAT, mergeable_ranks=ranks,
                            special_tokens={s: 151643 + i for i, s in enumerate(SPECIALS)})
    im_start, im_end, pad = 151644, 151645, 151655
    nl = enc.encode("\n")
    asst = enc.encode("assistant")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    spec = json.load(open(sys.argv[2]))
    out = []
    for item in spec["items"]:
        tokens = []
        for w, h in item["image_sizes"]:
            rh, rw = smart_resize(h, w, 32, spec["min_pixels"], spec["max_pixels"])
            tokens.append((rh // 16) * (rw // 16) // 4)
        text = ""
        for t in item["conversations"]:
            role = {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"])
            content = re.sub(r"<img>.*?</img>", "<|vision_start|><|image_pad|><|vision_end|>", t["value"], flags=re.S)
            text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
        ids = []
        counts = iter(tokens)
        for t in enc.encode(text, allowed_special="all"):
            ids.extend([pad] * next(counts) if t == pad else [t])
        labels = [-100] * len(ids)
        head = [im_start] + asst + nl
        for i in range(len(ids)):
            if ids[i:i + len(head)] == head:
                j = i + len(head)
                end = ids.index(im_end, j)
                for k in range(j, end + 1 + len(nl)):
                    labels[k] = ids[k]
        out.append({"input_ids": ids, "labels": labels})
    json.dump(out, open(sys.argv[3], "w"))


if __name__ == "__main__":
    main()
