"""The original ID_reference_data scripts' rules (vcr_trans.py, f30k_trans.py, ref_trans.py,
movienet/trans_loc.py), restated over a release in its own layout, as the oracle of `idavlm-shards build`.

Their random draws (random.sample of names, random.random for prompt forms and flips, random.choice /
random.sample of follow-ups and templates) are replayed from the choices `build --dump-choices` recorded,
so the conversations and crops must come out identical. Crops are cut with PIL (Image.crop, then
FLIP_LEFT_RIGHT) and written as raw RGB. Paths in the text are named as `build` names them (it embeds
crops instead of writing files beside the dataset).

    python build_ref.py SOURCE ROOT CHOICES.jsonl OUT_DIR [--split S] [--templates T.json]

Writes OUT_DIR/expected.json: {"samples": [{"record", "turns", "images": [path...]}],
"skipped": {reason: count}} and OUT_DIR/crops/<n>.rgb (+ .size) for every image of every sample, in order.
"""
import json, os, pickle, re, sys
from PIL import Image

source, root, choices_path, out = sys.argv[1:5]
opts = dict(zip(sys.argv[5::2], sys.argv[6::2]))
split = opts.get("--split", "train")
choices = {}
for line in open(choices_path):
    c = json.loads(line)
    choices.setdefault(c["record"], []).append(c["choices"])

samples, skipped = [], {}
os.makedirs(os.path.join(out, "crops"), exist_ok=True)
n_img = [0]


def skip(why):
    skipped[why] = skipped.get(why, 0) + 1


def emit(record, turns, images):
    """images: (path, PIL image) in the text's order."""
    paths = []
    for path, im in images:
        im = im.convert("RGB")
        base = os.path.join(out, "crops", str(n_img[0]))
        open(base + ".rgb", "wb").write(im.tobytes())
        open(base + ".size", "w").write(f"{im.width} {im.height}")
        n_img[0] += 1
        paths.append(path)
    samples.append({"record": record, "turns": turns, "images": paths})


class Replay:
    """random's calls of the original, answered from the recorded choices."""

    def __init__(self, values, names=None, pick=None):
        self.values, self.names, self.pick = list(values), names, pick

    def random(self):
        return self.values.pop(0) if self.values else 0.0

    def sample(self, population, k):
        if self.names is not None and population is NAMES:
            return list(self.names[:k])
        return [self.pick]

    def choice(self, seq):
        return self.pick


NAMES = object()  # the names list: replayed, so its content does not matter here


def crop(path, box, rnd):
    image = Image.open(path)
    cropped = image.crop(box)
    if rnd.random() > 0.5:
        cropped = cropped.transpose(Image.FLIP_LEFT_RIGHT)
    return cropped


def vcr():
    lines = [l for l in open(os.path.join(root, "vcr1annots", f"{split}.jsonl")) if l.strip()]
    for ins_id, line in enumerate(lines):
        instance = json.loads(line)
        ch = (choices.get(ins_id) or [None])[0]
        rnd = Replay(
            ([1.0 if ch["scene_first"] else 0.0] + [1.0 if f else 0.0 for f in ch["flips"]]) if ch else [],
            names=ch["names"] if ch else [f"N{i}" for i in range(200)],
            pick=ch["follow_up"] if ch else "explain why",
        )
        ques_org, ans_org, rat_org = instance["question_orig"], instance["answer_orig"], instance["rationale_orig"]
        objects = instance["objects"]
        img_ids, iid = {}, 1
        pattern = re.compile(r"\b(\d+)\b")
        cur_names = rnd.sample(NAMES, len(objects))
        flag = 1
        for text in (ques_org, ans_org, rat_org):
            for match in re.finditer(pattern, text):
                n = match.group(0)
                if n not in img_ids:
                    # (a 0 refers to no object here; the original took objects[-1])
                    if int(n) > len(objects) or int(n) == 0:
                        flag = 0
                        break
                    elif objects[int(n) - 1] == "person":
                        img_ids[n] = cur_names[int(n) - 1]
                    else:
                        img_ids[n] = "image " + str(iid)
                        iid += 1
            if flag == 0:
                break
        if flag == 0:
            skip("unknown object index")
            continue
        if len(img_ids) > 5:
            skip("more than 5 referenced entities")
            continue
        image_rel = "vcr1images/" + instance["img_fn"]
        image_path = os.path.join(root, image_rel)
        meta_fn = instance.get("metadata_fn", instance["img_fn"][:-3] + "json")
        if not os.path.exists(image_path):
            skip("missing image or box file")
            continue
        boxes = json.load(open(os.path.join(root, "vcr1images", meta_fn)))
        size = boxes["height"] * boxes["width"]
        stem = instance["img_fn"][:-4]
        crops = []
        flag = 1
        scene_first = rnd.random() > 0.5
        img_info = f"In the image 0: <img>{image_rel}</img>\nthere are some object or person images. " if scene_first else ""
        for i, box in enumerate(boxes["boxes"]):
            if str(i + 1) in img_ids:
                box_coord = box[:4]
                if (box_coord[3] - box_coord[1]) * (box_coord[2] - box_coord[0]) < size * 0.08:
                    flag = 0
                    break
                out_path = f"vcr1images/{stem}_{i}.png"
                crops.append((out_path, crop(image_path, box_coord, rnd)))
                sep = ": " if scene_first else " is "
                img_info += f"{img_ids[str(i + 1)]}{sep}<img>{out_path}</img>\n"
        if flag == 0:
            skip("box under 8% of the image")
            continue
        if not scene_first:
            img_info += f"In the image <img>{image_rel}</img>\n"

        def relabel(org):
            s = ""
            for w in org.split():
                if w[0].isnumeric():
                    if len(w) == 1:
                        s = s + img_ids[w] + " "
                    elif w[:2].isnumeric():
                        s = s + img_ids[w[:2]] + w[2:] + " "
                    else:
                        s = s + img_ids[w[0]] + w[1:] + " "
                else:
                    s = s + w + " "
            return s[:-1]

        try:
            question, answer, rationale = relabel(ques_org), relabel(ans_org), relabel(rat_org)
        except KeyError:
            skip("unresolvable number")
            continue
        follow = rnd.choice(["explain why", "give a reason for the answer"])
        turns = [
            {"from": "user", "value": img_info + question},
            {"from": "assistant", "value": answer},
            {"from": "user", "value": follow},
            {"from": "assistant", "value": rationale},
        ]
        scene = (image_rel, Image.open(image_path))
        emit(ins_id, turns, [scene] + crops if scene_first else crops + [scene])


def flickr30k():
    key_words = ["people", " man", " men", "woman", "women", "boy", "girl", "person", "child", "lady", "guy", "someone",
                 "kid", "female", " male", "player", "audience", "adult", "biker", "mom", "mother"]
    pattern = re.compile(r"<ph_st>(.*?)<ph_ed>")
    lines = [l for l in open(os.path.join(root, f"CWB_flickr30k_{split}.jsonl")) if l.strip()]
    for rec, line in enumerate(lines):
        instance = json.loads(line)
        ch = (choices.get(rec) or [None])[0]
        rnd = Replay([1.0 if f else 0.0 for f in ch["flips"]] if ch else [], names=ch["names"] if ch else [f"N{i}" for i in range(9)],
                     pick=ch["template"] if ch else "<image>")
        caption = instance["sentence"]
        if len(caption.split()) < 10:
            skip("caption under 10 words")
            continue
        matches = pattern.findall(caption)
        people_id = {}
        for i, match in enumerate(matches):
            if any(k in match.lower() for k in key_words):
                for b_id in instance["boxes_seq"][i]:
                    people_id[b_id] = 1
        if len(people_id) > 5:
            skip("more than 5 people")
            continue
        people_name = rnd.sample(NAMES, len(people_id))
        for i, k in enumerate(people_id.keys()):
            people_id[k] = people_name[i]
        match_dict = {}
        for i, match in enumerate(matches):
            if any(k in match.lower() for k in key_words):
                box_ids = instance["boxes_seq"][i]
                name = ""
                for j, b_id in enumerate(box_ids):
                    if len(box_ids) > 1 and j == len(box_ids) - 2:
                        name = name + people_id[b_id] + " and "
                    else:
                        name = name + people_id[b_id] + ", "
                match_dict["<ph_st>" + match + "<ph_ed>"] = name[:-2]
            else:
                match_dict["<ph_st>" + match + "<ph_ed>"] = match
        source_rel = "flickr30k-images/" + str(instance["image_id"]) + ".jpg"
        source_img = os.path.join(root, source_rel)
        if not os.path.exists(source_img):
            skip("missing image")
            continue
        question = "" if len(people_id) == 0 else "Given some people characters, "
        flag, crops = 1, []
        for k, v in people_id.items():
            p = f"flickr30k-crops/{instance['id']}/{v}.png"
            question = question + v + " is <img>" + p + "</img>\n, "
            box = instance["boxes"][k]
            if (box[3] - box[1]) * (box[2] - box[0]) < 3000:
                flag = 0
                break
            crops.append((p, crop(source_img, box, rnd)))
        if flag == 0:
            skip("box under 3000 px2")
            continue
        question = question[:-2] + ". "
        question = question + rnd.sample(None, 1)[0]
        question = question.replace("<image>", "<img>" + source_rel + "</img>\n")
        answer = caption
        for org_m, tar_m in match_dict.items():
            answer = answer.replace(org_m, tar_m)
        turns = [{"from": "user", "value": question}, {"from": "assistant", "value": answer}]
        emit(rec, turns, crops + [(source_rel, Image.open(source_img))])


def refcoco():
    splits = split.split(",")
    seen, rec = set(), 0
    coco = "images/mscoco/images/train2014" if os.path.isdir(os.path.join(root, "images/mscoco/images/train2014")) else "train2014"
    for d in ["refcoco", "refcoco+", "refcocog"]:
        if not os.path.isdir(os.path.join(root, d)):
            continue
        refs_file = next(f for f in ["refs(unc).p", "refs(umd).p", "refs(google).p"] if os.path.exists(os.path.join(root, d, f)))
        refs = pickle.load(open(os.path.join(root, d, refs_file), "rb"), encoding="latin1")
        inst = json.load(open(os.path.join(root, d, "instances.json")))
        images = {im["id"]: im for im in inst["images"]}
        anns = {a["id"]: a for a in inst["annotations"]}
        for r in refs:
            if r["split"] not in splits:
                continue
            file_name = r["file_name"]
            if file_name in seen:
                skip("object already referred (another ref or dataset)")
                continue
            seen.add(file_name)
            ch = (choices.get(rec) or [None])[0]
            rec += 1
            rnd = Replay([1.0 if ch and ch["flip"] else 0.0])
            im = images[r["image_id"]]
            image_rel = coco + "/" + im["file_name"]
            image_path = os.path.join(root, image_rel)
            if not os.path.exists(image_path):
                skip("missing image")
                continue
            bbox = anns[r["ann_id"]]["bbox"]
            bbox = [bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]]
            dest = "refcoco-crops/" + file_name[:-4] + "_crop.png"
            c = crop(image_path, bbox, rnd)
            h, w = im["height"], im["width"]
            bbox = [int(1000 * bbox[0] / w), int(1000 * bbox[1] / h), int(1000 * bbox[2] / w), int(1000 * bbox[3] / h)]
            user = f"Picture 1: <img>{dest}</img>\nPicture 2:<img>{image_rel}</img>\nIdentify the Picture 1 instance in the Picture 2 with grounding:"
            answer = f"<ref>Picture 1</ref><box>({bbox[0]},{bbox[1]}),({bbox[2]},{bbox[3]})</box>"
            emit(rec - 1, [{"from": "user", "value": user}, {"from": "assistant", "value": answer}],
                 [(dest, c), (image_rel, Image.open(image_path))])


def movienet():
    split_file = opts.get("--split-file", os.path.join(root, f"{split}_split.txt"))
    train_anno = [s.strip() for s in open(split_file).readlines() if s.strip()]
    for rec, anno_id in enumerate(train_anno):
        anno = json.load(open(os.path.join(root, "files/annotation", f"{anno_id}.json")))
        meta_new = os.path.join(root, "files/meta_new", f"{anno_id}.json")
        meta = json.load(open(meta_new if os.path.exists(meta_new) else os.path.join(root, "files/meta", f"{anno_id}.json")))
        names = {c["id"]: c["character"] for c in meta["cast"]}
        id2img, img2id, imgsize = {}, {}, {}
        for c in anno["cast"]:
            pid = c["pid"]
            imgid = str(c["shot_idx"]) + "-" + str(c["img_idx"])
            if pid != "others":
                id2img.setdefault(pid, []).append(imgid)
            img2id.setdefault(imgid, {})[pid] = c["body"]["bbox"]
            imgsize[imgid] = c["resolution"]
        id_idimg = {}
        for id, name in names.items():
            if id in id2img:
                for img in id2img[id]:
                    if len(img2id[img]) == 1:
                        area = imgsize[img][0] * imgsize[img][1]
                        box = img2id[img][id]
                        if (box[2] - box[0]) * (box[3] - box[1]) > area * 0.4:
                            id_idimg.setdefault(id, []).append(img)
        id_imgpair = {}
        for id, idimg in id_idimg.items():
            img_pair = []
            for i, img in enumerate(id2img[id]):
                if img == idimg[0]:
                    break
            j = i + 1
            while j < len(id2img[id]):
                if id2img[id][j] in idimg:
                    i = j
                elif len(img2id[id2img[id][j]]) > 1:
                    area = imgsize[id2img[id][j]][0] * imgsize[id2img[id][j]][1]
                    box = img2id[id2img[id][j]][id]
                    if (box[2] - box[0]) * (box[3] - box[1]) > area * 0.15:
                        if len(img_pair) > 0:
                            last_pair = img_pair[-1]
                            last_shot = int(last_pair[1].split("-")[0])
                            cur_shot = int(id2img[id][j].split("-")[0])
                            if not (id2img[id][i] == last_pair[0] and cur_shot - last_shot <= 3):
                                img_pair.append([id2img[id][i], id2img[id][j]])
                        else:
                            img_pair.append([id2img[id][i], id2img[id][j]])
                j += 1
            id_imgpair[id] = img_pair
        for id, imgpair in id_imgpair.items():
            name = names[id]
            for pair in imgpair:
                box = img2id[pair[1]][id]
                w, h = imgsize[pair[1]]
                bbox = [int(1000 * box[0] / w), int(1000 * box[1] / h), int(1000 * box[2] / w), int(1000 * box[3] / h)]
                ref = f"240P/{anno_id}/shot_{pair[0].split('-')[0].zfill(4)}_img_{pair[0].split('-')[1]}.jpg"
                src = f"240P/{anno_id}/shot_{pair[1].split('-')[0].zfill(4)}_img_{pair[1].split('-')[1]}.jpg"
                if not (os.path.exists(os.path.join(root, ref)) and os.path.exists(os.path.join(root, src))):
                    skip("missing frame")
                    continue
                user = f"{name} is <img>{ref}</img>\nIn the image: <img>{src}</img>\nIdentify {name} with grounding."
                answer = f"<ref>{name}</ref><box>({bbox[0]},{bbox[1]}),({bbox[2]},{bbox[3]})</box>"
                emit(rec, [{"from": "user", "value": user}, {"from": "assistant", "value": answer}],
                     [(ref, Image.open(os.path.join(root, ref))), (src, Image.open(os.path.join(root, src)))])


{"vcr": vcr, "flickr30k": flickr30k, "refcoco": refcoco, "movienet": movienet}[source]()
json.dump({"samples": samples, "skipped": skipped}, open(os.path.join(out, "expected.json"), "w"), indent=1)
