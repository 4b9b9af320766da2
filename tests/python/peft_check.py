"""Checks an idavlm LoRA adapter folder against the `peft` package.

usage: peft_check.py ADAPTER_DIR BASE_MODEL_DIR MERGED_DIR

1. A reference module with the base model's LLM linears, wte and lm_head under their Hugging Face names
   gets PEFT's own adapters for the same LoraConfig; the key names, shapes and config fields PEFT writes
   must be ours.
2. PEFT loads our adapter into that module (PeftModel.from_pretrained) and merges it; the merged
   weights must be those of idavlm's `export --merge` (bf16: within one bf16 rounding).
Prints one line per check; exits non-zero on the first mismatch.
"""
import glob, json, os, re, sys, tempfile

import torch
import torch.nn as nn
from safetensors.torch import load_file
from peft import LoraConfig, PeftModel, get_peft_model

adapter_dir, base_dir, merged_dir = sys.argv[1:4]


def load_dir(d):
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    return out


ours_cfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
base = load_dir(base_dir)
merged_ours = load_dir(merged_dir)
lora_cfg = LoraConfig(
    r=ours_cfg["r"],
    lora_alpha=ours_cfg["lora_alpha"],
    lora_dropout=ours_cfg["lora_dropout"],
    target_modules=ours_cfg["target_modules"],
    modules_to_save=ours_cfg["modules_to_save"],
    task_type="CAUSAL_LM",
)


class Ref(nn.Module):
    def prepare_inputs_for_generation(self, *a, **k):
        return {}


def build():
    """The LLM's linears, wte and lm_head of the base model, as nn.Linear / nn.Embedding, same names."""
    root = Ref()
    pat = re.compile(r"^(transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.w1|mlp\.w2|mlp\.c_proj)|transformer\.wte|lm_head)\.weight$")
    for name, w in base.items():
        m = pat.match(name)
        if not m:
            continue
        path = m.group(1).split(".")
        parent = root
        for p in path[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        if path[-1] == "wte":
            mod = nn.Embedding(w.shape[0], w.shape[1])
        else:
            mod = nn.Linear(w.shape[1], w.shape[0], bias=(m.group(1) + ".bias") in base)
        with torch.no_grad():
            mod.weight.copy_(w.float())
            if mod.__class__ is nn.Linear and mod.bias is not None:
                mod.bias.copy_(base[m.group(1) + ".bias"].float())
        parent.add_module(path[-1], mod)
    return root


# 1. What PEFT writes for the same config.
ref = get_peft_model(build(), lora_cfg)
with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    theirs = load_file(os.path.join(d, "adapter_model.safetensors"))
    their_cfg = json.load(open(os.path.join(d, "adapter_config.json")))
ours = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
if sorted(ours) != sorted(theirs):
    print("key names differ:\n ours only:", sorted(set(ours) - set(theirs))[:10], "\n peft only:", sorted(set(theirs) - set(ours))[:10])
    sys.exit(1)
for k in ours:
    if tuple(ours[k].shape) != tuple(theirs[k].shape):
        print(f"{k}: shape {tuple(ours[k].shape)}, peft {tuple(theirs[k].shape)}")
        sys.exit(1)
print(f"keys: {len(ours)} adapter tensors, names and shapes as peft {__import__('peft').__version__} writes them")
for f in ["peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "fan_in_fan_out", "use_rslora", "use_dora"]:
    if ours_cfg.get(f) != their_cfg.get(f):
        print(f"adapter_config.json {f}: ours {ours_cfg.get(f)!r}, peft {their_cfg.get(f)!r}")
        sys.exit(1)
for f in ["target_modules", "modules_to_save"]:
    if set(ours_cfg.get(f) or []) != set(their_cfg.get(f) or []):
        print(f"adapter_config.json {f}: ours {ours_cfg.get(f)!r}, peft {their_cfg.get(f)!r}")
        sys.exit(1)
print("config: the fields peft reads are the ones it writes")

# 2. PEFT loads our adapter and merges it.
pm = PeftModel.from_pretrained(build(), adapter_dir)
m = pm.merge_and_unload()
sd = m.state_dict()
checked = 0
for name, w in sd.items():
    if name not in merged_ours:
        continue
    a = merged_ours[name].float()
    b = w.float().to(torch.bfloat16).float() if merged_ours[name].dtype == torch.bfloat16 else w.float()
    tol = (b.abs() * 2.0 ** -7 + 1e-6) if merged_ours[name].dtype == torch.bfloat16 else (b.abs() * 1e-5 + 1e-7)
    bad = ((a - b).abs() > tol).sum().item()
    if bad:
        print(f"{name}: {bad} elements differ from peft's merge (max {(a - b).abs().max().item():.3g})")
        sys.exit(1)
    checked += 1
print(f"merge: {checked} tensors equal peft's merge_and_unload")
