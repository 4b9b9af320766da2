"""The Python data-path anchor of PERF.md on the same images and core as `idavlm-shards bench`:
PIL decode + RGB + bicubic resize to SIZE x SIZE + ToTensor-style scaling + CLIP normalisation.
    python pil_anchor.py SIZE FILES...   -> prints images/s on one core"""
import sys, time, io
import numpy as np
from PIL import Image

size, files = int(sys.argv[1]), sys.argv[2:]
blobs = [open(f, "rb").read() for f in files]
mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)[:, None, None]
std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)[:, None, None]
t = time.perf_counter()
for b in blobs:
    img = Image.open(io.BytesIO(b)).convert("RGB").resize((size, size), Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    x = (x - mean) / std
print(f"{len(blobs) / (time.perf_counter() - t):.1f}")
