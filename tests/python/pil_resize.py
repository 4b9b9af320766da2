"""PIL oracle for the image preprocessing tests: for each input image file, write PIL's bicubic resize to
SIZE x SIZE (RGB) as raw RGB8 bytes to OUT_DIR/<name>.rgb, and the same resize with the horizontal pass
forced first (Pillow <= 12.2's order: a width-only resize, then a height-only one, each a single PIL
pass rounded to u8) to OUT_DIR/<name>.h1.rgb.   python pil_resize.py SIZE OUT_DIR FILES..."""
import os, sys
from PIL import Image

size, out = int(sys.argv[1]), sys.argv[2]
for f in sys.argv[3:]:
    img = Image.open(f).convert("RGB")
    name = os.path.join(out, os.path.basename(f))
    open(name + ".rgb", "wb").write(img.resize((size, size), Image.BICUBIC).tobytes())
    legacy = img.resize((size, img.height), Image.BICUBIC).resize((size, size), Image.BICUBIC)
    open(name + ".h1.rgb", "wb").write(legacy.tobytes())
print(__import__("PIL").__version__)
