//! The MM-ID benchmark file in its published form: tagged placeholders, `./images/...` paths,
//! `image_0`-based matching items; read, converted and answered as the original `inference_test.py`.

use std::path::Path;
use std::process::Command;

use idavlm_shards::mmid::{read_bench, Item};
use idavlm_tests::{bin, tiny_checkpoint};

/// The location item quoted from the published `benchmark_mmid.json`, a matching item in the same
/// form, and small generated images at their paths under `root`.
fn published_items(root: &Path) -> std::path::PathBuf {
    let items = serde_json::json!([
        {"id": 1, "image_1": "./images/movie/12 Strong (2018)/Ben Milo_shot_0083_img_2_special.jpg",
         "image_2": "./images/movie/12 Strong (2018)/shot_0135_img_0.jpg",
         "question": "Ben Milo is <img>image_1</img>\n In the image: <img>image_2</img>\n Identify Ben Milo with grounding.",
         "type": "location", "answer": "[383, 50, 555, 231]", "ground_target": "Ben Milo"},
        {"id": 2, "image_0": "./images/movie/Up (2009)/Carl_ref.jpg",
         "image_1": "./images/movie/Up (2009)/c1.jpg", "image_2": "./images/movie/Up (2009)/c2.jpg",
         "image_3": "./images/movie/Up (2009)/c3.jpg", "image_4": "./images/movie/Up (2009)/c4.jpg",
         "question": "Carl is <img>image_0</img>\n In the following four images, Which is Carl? Image 1: <img>image_1</img>\n Image 2: <img>image_2</img>\n Image 3: <img>image_3</img>\n Image 4: <img>image_4</img>",
         "type": "matching", "answer": "Image 3"}
    ]);
    for it in items.as_array().unwrap() {
        for (k, v) in it.as_object().unwrap() {
            if k.starts_with("image_") {
                let f = root.join(v.as_str().unwrap());
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                std::fs::write(&f, idavlm_shards::synth::photo_jpeg(64, 48, k.len() as u64)).unwrap();
            }
        }
    }
    let json = root.join("benchmark_mmid.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&items).unwrap()).unwrap();
    json
}

/// What the original script does: each `image_k` key (from 0 for matching, from 1 otherwise) replaced
/// by the item's path as plain text, in key order.
fn original_prompt(raw: &serde_json::Value) -> String {
    let mut q = raw["question"].as_str().unwrap().to_string();
    let first = if raw["type"] == "matching" { 0 } else { 1 };
    let mut k = first;
    while let Some(p) = raw.get(format!("image_{k}")) {
        q = q.replace(&format!("image_{k}"), p.as_str().unwrap());
        k += 1;
    }
    q
}

#[test]
fn the_published_item_form_converts_and_answers_with_the_original_prompt() {
    let d = tempfile::tempdir().unwrap();
    let json = published_items(d.path());
    let raw: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let items = read_bench(&json).unwrap();
    for (it, r) in items.iter().zip(raw.as_array().unwrap()) {
        assert_eq!(it.filled_question(), original_prompt(r), "item {}", it.id);
        assert!(!it.filled_question().contains("<img><img>"));
    }
    assert_eq!(items[1].image_paths().unwrap().len(), 5, "matching numbers its images from image_0");
    // The bare form (no tags around the keys) is read too: each key becomes one <img>PATH</img>.
    let bare = Item { question: "A is image_1 and image_10".into(), ..items[0].clone() };
    let bare = Item { images: vec![("image_1".into(), "a.jpg".into()), ("image_10".into(), "b.jpg".into())], ..bare };
    assert_eq!(bare.filled_question(), "A is <img>a.jpg</img> and <img>b.jpg</img>");

    // convert-eval: the Parquet form holds the same prompt text and the images' bytes.
    let out = d.path().join("eval-parquet");
    let o = Command::new(bin("idavlm-shards")).arg("convert-eval").arg(&json).arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let parquet = read_bench(&out).unwrap();
    for (j, p) in items.iter().zip(&parquet) {
        assert_eq!(j.filled_question(), p.filled_question());
    }

    // idavlm-infer answers both forms alike.
    let ckpt = d.path().join("model");
    tiny_checkpoint(&ckpt);
    let (pj, pp) = (d.path().join("json.jsonl"), d.path().join("parquet.jsonl"));
    for (bench, preds) in [(&json, &pj), (&out, &pp)] {
        let o = idavlm_tests::infer(&ckpt, bench, preds, &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let answers = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["prediction"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(answers(&pj).len(), 2);
    assert_eq!(answers(&pj), answers(&pp));
    // --dtype: f32 is the CPU default (the same answers); bf16 runs on the CPU too.
    let (pf, pb) = (d.path().join("f32.jsonl"), d.path().join("bf16.jsonl"));
    for (dtype, preds) in [("f32", &pf), ("bf16", &pb)] {
        let o = idavlm_tests::infer(&ckpt, &json, preds, &["--dtype", dtype]);
        assert!(o.status.success(), "--dtype {dtype}: {}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(answers(&pf), answers(&pj));
    assert_eq!(answers(&pb).len(), 2);
}

#[test]
fn a_missing_image_fails_before_any_work_naming_the_item_and_leaves_nothing_behind() {
    let d = tempfile::tempdir().unwrap();
    let json = published_items(d.path());
    let gone = d.path().join("images/movie/Up (2009)/c4.jpg");
    std::fs::remove_file(&gone).unwrap();
    let out = d.path().join("eval-parquet");
    let o = Command::new(bin("idavlm-shards")).arg("convert-eval").arg(&json).arg(&out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("item 2") && err.contains("c4.jpg"), "{err}");
    assert!(!out.exists(), "a failed conversion left {} behind", out.display());
    // idavlm-infer checks every item before loading the model: no output, no partial file.
    let ckpt = d.path().join("model");
    tiny_checkpoint(&ckpt);
    let preds = d.path().join("preds.jsonl");
    std::fs::write(&preds, "earlier results\n").unwrap();
    let o = idavlm_tests::infer(&ckpt, &json, &preds, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("item 2") && err.contains("c4.jpg") && err.contains("nothing was generated"), "{err}");
    assert_eq!(std::fs::read_to_string(&preds).unwrap(), "earlier results\n", "--out was touched");
    // A path that leaves the benchmark's folder is refused, not followed.
    let mut raw: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    raw[0]["image_1"] = serde_json::json!("../../etc/passwd");
    std::fs::write(&json, serde_json::to_vec(&raw).unwrap()).unwrap();
    let e = idavlm_shards::mmid::check_items(&read_bench(&json).unwrap(), d.path()).unwrap_err().to_string();
    assert!(e.contains("item 1") && e.contains("leaves the image root"), "{e}");
}

#[test]
fn unscorable_items_are_reported_as_invalid_and_an_interrupted_run_resumes() {
    let d = tempfile::tempdir().unwrap();
    let json = published_items(d.path());
    let mut raw: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    raw[1]["answer"] = serde_json::json!([]);
    std::fs::write(&json, serde_json::to_vec(&raw).unwrap()).unwrap();
    let ckpt = d.path().join("model");
    tiny_checkpoint(&ckpt);
    let preds = d.path().join("preds.jsonl");
    // A partial run left by an interrupted one (the location item answered, a torn last line).
    let o = idavlm_tests::infer(&ckpt, &json, &preds, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let full = std::fs::read_to_string(&preds).unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("invalid benchmark item") && table.contains("item 2"), "{table}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("preds.summary.json")).unwrap()).unwrap();
    assert_eq!((summary["matching"]["invalid"].as_u64(), summary["matching"]["accuracy"].is_null()), (Some(1), true));
    let first = full.lines().find(|l| l.contains("\"location\"")).unwrap();
    let partial = d.path().join("preds.jsonl.partial");
    std::fs::write(&partial, format!("{first}\n{{\"id\": \"2\", \"ty")).unwrap();
    std::fs::remove_file(&preds).unwrap();
    let o = idavlm_tests::infer(&ckpt, &json, &preds, &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = idavlm_tests::infer(&ckpt, &json, &preds, &["--resume"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("1 of 2 items already answered"), "{err}");
    assert_eq!(std::fs::read_to_string(&preds).unwrap(), full, "resumed predictions equal a straight run's");
    assert!(!partial.exists());
}
