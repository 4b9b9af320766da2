"""torch.optim.AdamW with parameter groups over the inputs idavlm's test wrote.

usage: adamw_groups.py IN.safetensors SPEC.json OUT.safetensors
IN: init.NAME (f32) and grad.T.NAME per step T; SPEC: {"betas", "eps", "lr", "weight_decay",
"groups": [{"match", "lr", "weight_decay"}], "factors": [lr factor of each step]}.
OUT: param.NAME, exp_avg.NAME, exp_avg_sq.NAME after the steps.
"""
import json, re, sys

import torch
from safetensors.torch import load_file, save_file

inp, spec, out = load_file(sys.argv[1]), json.load(open(sys.argv[2])), sys.argv[3]
names = sorted(k[len("init."):] for k in inp if k.startswith("init."))
params = {n: torch.nn.Parameter(inp["init." + n].clone()) for n in names}
glob = lambda g: re.compile("^" + ".*".join(re.escape(p) for p in g.split("*")) + "$")
groups = [{"params": [], "lr": spec["lr"], "weight_decay": spec["weight_decay"], "peak": spec["lr"]} for _ in spec["groups"]]
rest = {"params": [], "lr": spec["lr"], "weight_decay": spec["weight_decay"], "peak": spec["lr"]}
for g, s in zip(groups, spec["groups"]):
    g["peak"] = s.get("lr") if s.get("lr") is not None else spec["lr"]
    g["weight_decay"] = s.get("weight_decay") if s.get("weight_decay") is not None else spec["weight_decay"]
for n in names:
    for g, s in zip(groups, spec["groups"]):
        if glob(s["match"]).match(n):
            g["params"].append(params[n])
            break
    else:
        rest["params"].append(params[n])
opt = torch.optim.AdamW([g for g in groups + [rest] if g["params"]], lr=spec["lr"], betas=tuple(spec["betas"]), eps=spec["eps"])
for t, f in enumerate(spec["factors"]):
    for g in opt.param_groups:
        g["lr"] = g["peak"] * f
    for n in names:
        params[n].grad = inp[f"grad.{t}.{n}"].clone()
    opt.step()
res = {}
for n in names:
    st = opt.state[params[n]]
    res["param." + n] = params[n].detach().clone()
    res["exp_avg." + n] = st["exp_avg"].clone()
    res["exp_avg_sq." + n] = st["exp_avg_sq"].clone()
save_file(res, out)
print(f"{len(names)} parameters, {len(spec['factors'])} steps, {len(opt.param_groups)} groups")
