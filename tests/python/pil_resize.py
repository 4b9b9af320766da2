"""PIL oracle for the image preprocessing test: for each input image file, write the PIL bicubic resize
(RGB, SIZE x SIZE) as raw RGB8 bytes to OUT_DIR/<name>.rgb.   python pil_resize.py SIZE OUT_DIR FILES..."""
import os, sys
from PIL import Image

size, out = int(sys.argv[1]), sys.argv[2]
for f in sys.argv[3:]:
    img = Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)
    open(os.path.join(out, os.path.basename(f) + ".rgb"), "wb").write(img.tobytes())
