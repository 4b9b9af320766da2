//! `idavlm-shards build`: each public release, written small in its true file layout (the annotation
//! files with their real field names and nesting), built to shards and compared with the original
//! scripts' rules restated in tests/python/build_ref.py, replaying the random choices the build recorded:
//! the same conversations, the same crops pixel for pixel, the same skipped counts. The output is
//! byte-identical for a seed whatever the thread count, and a malformed record stops the build naming
//! its file and line.
//!
//! The releases' images are lossless PNG under their `.jpg` names (PIL and our decoder read by content),
//! so crops compare exactly: JPEG decoders differ in rounding.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use idavlm_tests::{bin, python, root};
use serde_json::{json, Value};

/// A test photo: a gradient with a few blocks, as PNG bytes.
fn photo(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = (x * 7 + y * 13 + seed * 31) % 256;
        image::Rgb([v as u8, ((x * y + seed) % 256) as u8, ((255 - v) ^ seed) as u8])
    });
    let mut b = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png).unwrap();
    b
}

fn write(p: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

fn jsonl(p: &Path, rows: &[Value]) {
    write(p, (rows.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n") + "\n").as_bytes());
}

fn build(source: &str, root: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(bin("idavlm-shards")).arg("build").arg(source).arg(root).arg(out).args(extra).output().unwrap()
}

fn build_ok(source: &str, root: &Path, out: &Path, extra: &[&str]) -> String {
    let o = build(source, root, out, extra);
    let s = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "build {source}: {s}\n{}", String::from_utf8_lossy(&o.stderr));
    s
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())).collect()
}

/// Builds SOURCE from `release`, checks it against the Python restatement and its determinism; returns
/// the build report.
fn check_source(source: &str, release: &Path, work: &Path, extra: &[&str], random: bool) -> Value {
    let out = work.join(format!("{source}-a"));
    let choices = work.join(format!("{source}.choices.jsonl"));
    let mut args = vec!["--seed", "5", "--workers", "2", "--row-group", "4", "--dump-choices"];
    let c = choices.display().to_string();
    args.push(&c);
    args.extend_from_slice(extra);
    build_ok(source, release, &out, &args);
    let report: Value = serde_json::from_slice(&std::fs::read(out.join("build-report.json")).unwrap()).unwrap();

    // The rules of the original, with our random choices replayed.
    let refdir = work.join(format!("{source}-ref"));
    let mut cmd = Command::new(python());
    cmd.arg(root().join("tests/python/build_ref.py")).arg(source).arg(release).arg(&choices).arg(&refdir);
    let mut k = 0;
    while k < extra.len() {
        if extra[k].starts_with("--") && k + 1 < extra.len() {
            cmd.arg(extra[k]).arg(extra[k + 1]);
            k += 2;
        } else {
            k += 1;
        }
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "build_ref.py: {}", String::from_utf8_lossy(&o.stderr));
    let expected: Value = serde_json::from_slice(&std::fs::read(refdir.join("expected.json")).unwrap()).unwrap();
    let ours = idavlm_shards::reader::Source::open(source, &out).unwrap().read_all().unwrap();
    let exp = expected["samples"].as_array().unwrap();
    assert_eq!(ours.len(), exp.len(), "{source}: samples written against the rules'");
    assert!(!ours.is_empty(), "{source}: the test release builds no sample");
    let mut img = 0;
    for (s, e) in ours.iter().zip(exp) {
        let turns: Vec<Value> = s.conversations.iter().map(|t| json!({"from": t.from, "value": t.value})).collect();
        assert_eq!(Value::Array(turns), e["turns"], "{source}: sample {}", s.id);
        let paths: Vec<&str> = s.images.iter().map(|b| b.path.as_str()).collect();
        let exp_paths: Vec<&str> = e["images"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
        assert_eq!(paths, exp_paths, "{source}: sample {}", s.id);
        for b in &s.images {
            let (px, w, h) = idavlm_shards::preprocess::decode_rgb8(&b.bytes, &b.path).unwrap();
            let want = std::fs::read(refdir.join(format!("crops/{img}.rgb"))).unwrap();
            let size = std::fs::read_to_string(refdir.join(format!("crops/{img}.size"))).unwrap();
            assert_eq!(format!("{w} {h}"), size, "{source}: {} of {}", b.path, s.id);
            assert!(px == want, "{source}: {} of {} differs from PIL's crop", b.path, s.id);
            img += 1;
        }
    }
    let mut skipped = report["skipped"].as_object().unwrap().clone();
    skipped.retain(|_, v| v.as_u64() != Some(0));
    assert_eq!(Value::Object(skipped), expected["skipped"], "{source}: skipped by reason");

    // The same seed gives the same bytes, on one thread or two; another seed other names and flips.
    let again = work.join(format!("{source}-b"));
    let mut args1: Vec<&str> = vec!["--seed", "5", "--workers", "1", "--row-group", "4"];
    args1.extend_from_slice(extra);
    build_ok(source, release, &again, &args1);
    assert_eq!(files(&out), files(&again), "{source}: not byte-identical for one seed");
    if random {
        let other = work.join(format!("{source}-c"));
        let mut args2: Vec<&str> = vec!["--seed", "6", "--row-group", "4"];
        args2.extend_from_slice(extra);
        build_ok(source, release, &other, &args2);
        assert_ne!(files(&out), files(&other), "{source}: the seed changes nothing");
    }
    report
}

fn vcr_release(root: &Path) {
    let (w, h) = (200.0, 120.0);
    for k in 0..4 {
        write(&root.join(format!("vcr1images/movie_a/{k}.jpg")), &photo(200, 120, k));
    }
    // Boxes [x1, y1, x2, y2, score]: large ones, one half outside the image with .5 coordinates (PIL
    // rounds half to even and pads with black), and a tiny one.
    let boxes = json!([[10.0, 10.0, 90.0, 110.0, 0.9], [-10.5, 20.5, 80.5, 119.5, 0.8], [100.0, 5.0, 190.0, 100.0, 0.9],
        [120.0, 30.0, 195.0, 118.0, 0.7], [60.5, 0.5, 150.5, 99.5, 0.9], [5.0, 5.0, 12.0, 12.0, 0.5], [30.0, 40.0, 130.0, 115.0, 0.9]]);
    for k in 0..4 {
        let meta = json!({"boxes": boxes, "segms": [], "names": ["person", "person", "car", "person", "dog", "person", "person"], "width": w, "height": h});
        write(&root.join(format!("vcr1images/movie_a/{k}.json")), meta.to_string().as_bytes());
    }
    let objects = json!(["person", "person", "car", "person", "dog", "person", "person"]);
    let rec = |img: u32, q: &str, a: &str, r: &str| {
        json!({"img_fn": format!("movie_a/{img}.jpg"), "metadata_fn": format!("movie_a/{img}.json"), "objects": objects,
            "question_orig": q, "answer_orig": a, "rationale_orig": r, "question": [], "answer_choices": [], "answer_label": 0})
    };
    let mut rows = vec![
        rec(0, "Why is 1 looking at 2 ?", "1 wants 3's keys .", "2 is holding them , and 1 is near 3 ."),
        rec(1, "What are 1 and 4 doing ?", "They are walking 5 .", "5 is on a leash held by 4 ."),
        rec(2, "Is 2 angry at 1 ?", "No , 2 is laughing .", "2's mouth is open and 1 smiles ."),
        rec(3, "Where is 7 going ?", "7 is leaving 3 behind .", "7 has the keys of 3 ."),
        rec(0, "What does 4 think of 1 ?", "4 likes 1 .", "4 smiles at 1,2 ."),
        rec(1, "Does 12 know 1 ?", "Yes .", "They met ."),
        rec(2, "Is 1 the 3rd one here ?", "Yes .", "1 stands first ."),
        rec(3, "Why is 6 small ?", "6 is far away .", "6 is in the back ."),
        rec(0, "Do 1 , 2 , 3 , 4 , 5 and 7 know each other ?", "Yes .", "They talk ."),
        rec(9, "Is 1 happy ?", "Yes .", "1 smiles ."),
        rec(1, "Why did 2 come with 7 ?", "2 is 7's friend .", "2 follows 7 ."),
        rec(2, "What is 4 holding ?", "4 holds 3's door .", "4 stands by 3 ."),
    ];
    rows.push(rec(3, "What is 0 ?", "A thing .", "It is there ."));
    jsonl(&root.join("vcr1annots/train.jsonl"), &rows);
}

#[test]
fn vcr_builds_by_the_original_rules_deterministically_and_names_a_malformed_record() {
    let d = tempfile::tempdir().unwrap();
    let release = d.path().join("vcr");
    vcr_release(&release);
    let report = check_source("vcr", &release, d.path(), &[], true);
    let skipped = &report["skipped"];
    assert_eq!(skipped["unknown object index"], 2, "{report}"); // 12 of 7 objects, and a 0
    assert_eq!(skipped["more than 5 referenced entities"], 1, "{report}");
    assert_eq!(skipped["box under 8% of the image"], 1, "{report}");
    assert_eq!(skipped["unresolvable number"], 1, "{report}");
    assert_eq!(skipped["missing image or box file"], 1, "{report}");
    assert_eq!(report["written"], 7, "{report}");
    // Both prompt forms are drawn over these records.
    let ours = idavlm_shards::reader::Source::open("vcr", &d.path().join("vcr-a")).unwrap().read_all().unwrap();
    let first: Vec<bool> = ours.iter().map(|s| s.conversations[0].value.starts_with("In the image 0:")).collect();
    assert!(first.contains(&true) && first.contains(&false), "{first:?}");

    // A record without its objects: the build stops naming the file and the line, and leaves nothing.
    let bad = d.path().join("vcr-bad");
    vcr_release(&bad);
    let ann = bad.join("vcr1annots/train.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(&ann).unwrap().lines().map(String::from).collect();
    let mut v: Value = serde_json::from_str(&lines[2]).unwrap();
    v.as_object_mut().unwrap().remove("objects");
    lines[2] = v.to_string();
    std::fs::write(&ann, lines.join("\n")).unwrap();
    let out = d.path().join("vcr-bad-out");
    let o = build("vcr", &bad, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("train.jsonl") && err.contains("line 3") && err.contains("objects"), "{err}");
    assert!(!out.exists(), "a failed build leaves no dataset folder");
}

fn flickr_release(root: &Path) {
    for k in 0..3 {
        write(&root.join(format!("flickr30k-images/{}.jpg", 100 + k)), &photo(220, 160, 10 + k));
    }
    let rec = |id: u32, img: u32, sentence: &str, boxes: Value, seq: Value| {
        json!({"id": id, "image_id": (100 + img).to_string(), "sentence": sentence, "boxes": boxes, "boxes_seq": seq})
    };
    let b = json!([[10.0, 10.0, 90.0, 150.0], [100.5, 20.5, 170.5, 155.5], [150.0, 5.0, 215.0, 120.0], [5.0, 100.0, 60.0, 158.0],
        [0.0, 0.0, 20.0, 20.0], [60.0, 30.0, 140.0, 140.0], [120.0, 60.0, 200.0, 150.0]]);
    let rows = vec![
        rec(1, 0, "<ph_st>A man<ph_ed> in a red shirt talks to <ph_st>two women<ph_ed> near <ph_st>a car<ph_ed> on the street .", b.clone(), json!([[0], [1, 2], [3]])),
        rec(2, 1, "<ph_st>A girl<ph_ed> and <ph_st>three boys<ph_ed> play with <ph_st>a ball<ph_ed> in the big green park .", b.clone(), json!([[0], [1, 2, 3], [5]])),
        rec(3, 2, "<ph_st>A dog<ph_ed> runs .", b.clone(), json!([[0]])),
        rec(4, 0, "<ph_st>Six people<ph_ed> stand together in a line for a photo in the sun .", b.clone(), json!([[0, 1, 2, 3, 5, 6]])),
        rec(5, 1, "<ph_st>A small child<ph_ed> holds <ph_st>a kite<ph_ed> high above the sand at the beach .", b.clone(), json!([[4], [0]])),
        rec(6, 7, "<ph_st>A woman<ph_ed> reads a book on a bench by the river at dusk today .", b.clone(), json!([[0]])),
        rec(7, 2, "<ph_st>A red car<ph_ed> waits at <ph_st>a light<ph_ed> on a wet road in the city .", b.clone(), json!([[0], [1]])),
        rec(8, 0, "<ph_st>a man<ph_ed> waves while <ph_st>a man<ph_ed> in a hat laughs at the bus stop .", b.clone(), json!([[0], [5]])),
    ];
    jsonl(&root.join("CWB_flickr30k_train.jsonl"), &rows);
    let templates = json!(["Describe <image> with the names.", "<image>Who is who here?"]);
    write(&root.join("templates.json"), templates.to_string().as_bytes());
}

#[test]
fn flickr30k_builds_by_the_original_rules_deterministically_and_names_a_malformed_record() {
    let d = tempfile::tempdir().unwrap();
    let release = d.path().join("f30k");
    flickr_release(&release);
    let t = release.join("templates.json").display().to_string();
    let report = check_source("flickr30k", &release, d.path(), &["--templates", &t], true);
    let skipped = &report["skipped"];
    assert_eq!(skipped["caption under 10 words"], 1, "{report}");
    assert_eq!(skipped["more than 5 people"], 1, "{report}");
    assert_eq!(skipped["box under 3000 px2"], 1, "{report}");
    assert_eq!(skipped["missing image"], 1, "{report}");
    assert_eq!(report["written"], 4, "{report}");

    let bad = d.path().join("f30k-bad");
    flickr_release(&bad);
    let ann = bad.join("CWB_flickr30k_train.jsonl");
    let text = std::fs::read_to_string(&ann).unwrap().replacen("[[0],[1,2],[3]]", "[[0],[1,9],[3]]", 1);
    std::fs::write(&ann, text).unwrap();
    let o = build("flickr30k", &bad, &d.path().join("f30k-bad-out"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("CWB_flickr30k_train.jsonl") && err.contains("line 1") && err.contains("box 9"), "{err}");
}

fn refcoco_release(root: &Path) {
    let coco = root.join("images/mscoco/images/train2014");
    for k in 1..=3 {
        write(&coco.join(format!("COCO_train2014_{k:012}.jpg")), &photo(240, 180, 20 + k));
    }
    let images: Vec<Value> = (1..=4).map(|k| json!({"id": k, "file_name": format!("COCO_train2014_{k:012}.jpg"), "width": 240, "height": 180})).collect();
    let anns = json!([{"id": 11, "image_id": 1, "bbox": [10.5, 20.5, 100.0, 120.0], "category_id": 1},
        {"id": 12, "image_id": 2, "bbox": [150.0, 30.0, 80.0, 140.0], "category_id": 1},
        {"id": 13, "image_id": 3, "bbox": [0.0, 0.0, 239.0, 179.0], "category_id": 3},
        {"id": 14, "image_id": 4, "bbox": [1.0, 1.0, 50.0, 50.0], "category_id": 1}]);
    let plain = json!([
        {"ref_id": 1, "ann_id": 11, "image_id": 1, "split": "train", "file_name": "COCO_train2014_000000000001_11.jpg", "sentences": [{"sent": "man on left"}], "category_id": 1},
        {"ref_id": 2, "ann_id": 12, "image_id": 2, "split": "train", "file_name": "COCO_train2014_000000000002_12.jpg", "sentences": [], "category_id": 1},
        {"ref_id": 3, "ann_id": 13, "image_id": 3, "split": "val", "file_name": "COCO_train2014_000000000003_13.jpg", "sentences": [], "category_id": 3},
        {"ref_id": 4, "ann_id": 14, "image_id": 4, "split": "train", "file_name": "COCO_train2014_000000000004_14.jpg", "sentences": [], "category_id": 1}]);
    let plus = json!([
        {"ref_id": 5, "ann_id": 11, "image_id": 1, "split": "train", "file_name": "COCO_train2014_000000000001_11.jpg", "sentences": [], "category_id": 1},
        {"ref_id": 6, "ann_id": 13, "image_id": 3, "split": "train", "file_name": "COCO_train2014_000000000003_13.jpg", "sentences": [], "category_id": 3}]);
    for (d, r) in [("refcoco", plain), ("refcoco+", plus)] {
        let dir = root.join(d);
        write(&dir.join("instances.json"), json!({"images": images, "annotations": anns, "categories": []}).to_string().as_bytes());
        // refer's refs are a pickled list of dicts (Python 2's protocol 2).
        let code = "import json, pickle, sys; pickle.dump(json.loads(sys.argv[1]), open(sys.argv[2], 'wb'), protocol=2)";
        let o = Command::new(python()).arg("-c").arg(code).arg(r.to_string()).arg(dir.join("refs(unc).p")).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn refcoco_builds_by_the_original_rules_from_refers_pickles() {
    let d = tempfile::tempdir().unwrap();
    let release = d.path().join("refcoco");
    refcoco_release(&release);
    let report = check_source("refcoco", &release, d.path(), &["--split", "train"], true);
    assert_eq!(report["skipped"]["object already referred (another ref or dataset)"], 1, "{report}");
    assert_eq!(report["skipped"]["missing image"], 1, "{report}");
    assert_eq!(report["written"], 3, "{report}");
    let both = d.path().join("both");
    let s = build_ok("refcoco", &release, &both, &["--split", "train,val"]);
    assert!(s.contains("-> 3 samples"), "{s}"); // the val ref of refcoco comes first, its train ref in refcoco+ is then a duplicate
}

fn movienet_release(root: &Path) {
    let movie = "tt0000001";
    let meta = json!({"imdb_id": movie, "cast": [{"id": "nm01", "character": "Rick"}, {"id": "nm02", "character": "Ilsa"}]});
    write(&root.join(format!("files/meta/{movie}.json")), meta.to_string().as_bytes());
    let c = |pid: &str, shot: u32, img: u32, b: [f64; 4]| json!({"pid": pid, "shot_idx": shot, "img_idx": img, "body": {"bbox": b}, "resolution": [200, 120]});
    let big = [10.0, 5.0, 150.0, 115.0];
    let mid = [20.0, 10.0, 80.0, 100.0];
    let cast = json!([
        c("nm01", 1, 0, big),
        c("nm01", 2, 1, mid), c("nm02", 2, 1, [100.0, 10.0, 190.0, 110.0]),
        c("nm01", 3, 0, mid), c("others", 3, 0, [120.0, 0.0, 180.0, 60.0]),
        c("nm02", 4, 0, big),
        c("nm01", 8, 2, mid), c("nm02", 8, 2, [90.0, 0.0, 190.0, 110.0]),
        c("nm01", 9, 0, big),
        c("nm01", 10, 1, mid), c("others", 10, 1, [0.0, 0.0, 10.0, 10.0]),
        c("nm01", 12, 2, [0.0, 0.0, 20.0, 20.0]), c("nm02", 12, 2, [30.0, 10.0, 120.0, 110.0]),
        c("nm01", 20, 0, mid), c("nm02", 20, 0, [100.0, 10.0, 190.0, 110.0]),
    ]);
    write(&root.join(format!("files/annotation/{movie}.json")), json!({"imdb_id": movie, "cast": cast}).to_string().as_bytes());
    for (k, (shot, img)) in [(1, 0), (2, 1), (3, 0), (4, 0), (8, 2), (9, 0), (10, 1), (12, 2)].iter().enumerate() {
        write(&root.join(format!("240P/{movie}/shot_{shot:04}_img_{img}.jpg")), &photo(200, 120, 40 + k as u32));
    }
    // shot 20's frame is not in the release: its pairs are skipped.
    write(&root.join("train_split.txt"), format!("{movie}\n").as_bytes());
}

#[test]
fn movienet_location_pairs_follow_the_original_walk() {
    let d = tempfile::tempdir().unwrap();
    let release = d.path().join("movienet");
    movienet_release(&release);
    let report = check_source("movienet", &release, d.path(), &[], false);
    // Rick: (1-0, 2-1), (1-0, 8-2), (9-0, 10-1), (9-0, 20-0: no frame); 3-0 is within 3 shots of the last
    // pair of the same reference, 12-2 covers too little. Ilsa: (4-0, 8-2), (4-0, 12-2), (4-0, 20-0: no frame).
    assert_eq!(report["written"], 5, "{report}");
    assert_eq!(report["skipped"]["missing frame"], 2, "{report}");

    // A movie whose annotation is not JSON: the build stops naming the file.
    std::fs::write(release.join("files/annotation/tt0000001.json"), "{not json").unwrap();
    let o = build("movienet", &release, &d.path().join("mn-bad"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("tt0000001.json") && err.contains("not JSON"), "{err}");
}
