use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use idavlm_shards::convert::{convert, ConvertOptions, OnBad};
use idavlm_shards::format::{read_row_group, row_group_sizes, Manifest};
use idavlm_shards::reader::{BadImagePolicy, LoadOptions, Reader, ReaderState, Source, StepShape};
use idavlm_tests::{bin, synth, tokenizer};

fn reader(dir: &std::path::Path, world: usize, rank: usize, micro: usize, accum: usize, inject: f64) -> Reader {
    let id = Source::open("id", &dir.join("id")).unwrap();
    let gen = Source::open("general", &dir.join("general")).unwrap();
    let n = id.layout.len();
    Reader::new(
        vec![id, gen],
        Arc::new(idavlm_shards::tokenizer::Tokenizer::load_default().unwrap()),
        LoadOptions { image_size: 28, max_len: 4096, bad_image: BadImagePolicy::Fail, workers: 1, resize: Default::default() },
        5,
        &[(0, n)],
        Some(1),
        StepShape { micro_batch: micro, accum, world, rank, inject_probability: inject, packing: None },
    )
    .unwrap()
}

/// Sample ids of `steps` steps of one rank, from `state`.
fn ids(r: &mut Reader, first: u64, steps: u64, mut state: ReaderState) -> (Vec<String>, ReaderState) {
    let mut out = Vec::new();
    for s in first..first + steps {
        let (reqs, after) = r.plan_step(s, state).unwrap();
        for req in reqs {
            let mb = r.loader.build(&req, s, after).unwrap();
            out.extend(mb.sample_ids);
        }
        state = after;
    }
    (out, state)
}

#[test]
fn global_order_is_deterministic_and_rank_shares_partition_it() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), 60, 10, 7);
    let st = ReaderState { seed: 5, ..Default::default() };
    let (single, _) = ids(&mut reader(d.path(), 1, 0, 2, 6, 0.0), 0, 5, st);
    assert_eq!(single, ids(&mut reader(d.path(), 1, 0, 2, 6, 0.0), 0, 5, st).0, "same order twice");
    // One epoch (60 samples = 5 steps of 12) is a permutation of the dataset.
    assert_eq!(single.iter().collect::<HashSet<_>>().len(), 60);
    for world in [2, 3] {
        let accum = 6 / world;
        let mut union = Vec::new();
        for rank in 0..world {
            union.extend(ids(&mut reader(d.path(), world, rank, 2, accum, 0.0), 0, 5, st).0);
        }
        let mut a = union.clone();
        a.sort();
        a.dedup();
        assert_eq!(a.len(), union.len(), "world {world}: ranks overlap");
        let mut b = single.clone();
        b.sort();
        assert_eq!(a, b, "world {world}: union differs from the global order");
    }
}

#[test]
fn resume_continues_exactly_and_survives_a_world_size_change() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), 50, 10, 8);
    let st = ReaderState { seed: 5, ..Default::default() };
    // Uninterrupted: 6 steps of global batch 12 at world 2.
    let mut straight = Vec::new();
    for rank in 0..2 {
        straight.extend(ids(&mut reader(d.path(), 2, rank, 2, 3, 0.0), 0, 6, st).0);
    }
    // 3 steps at world 2, then resume from the saved state at world 3 (same global batch 12).
    let mut resumed = Vec::new();
    let mut saved = st;
    for rank in 0..2 {
        let (v, s) = ids(&mut reader(d.path(), 2, rank, 2, 3, 0.0), 0, 3, st);
        resumed.extend(v);
        saved = s;
    }
    assert_eq!(saved.main_position, 36);
    for rank in 0..3 {
        resumed.extend(ids(&mut reader(d.path(), 3, rank, 2, 2, 0.0), 3, 3, saved).0);
    }
    let count = |v: &[String]| {
        v.iter().fold(BTreeMap::new(), |mut m, s| {
            *m.entry(s.clone()).or_insert(0) += 1;
            m
        })
    };
    assert_eq!(count(&straight), count(&resumed), "a sample was repeated or skipped");
    // Same world size: identical continuation, in order.
    let (all, _) = ids(&mut reader(d.path(), 1, 0, 2, 6, 0.0), 0, 4, st);
    let (a, s) = ids(&mut reader(d.path(), 1, 0, 2, 6, 0.0), 0, 2, st);
    let (b, _) = ids(&mut reader(d.path(), 1, 0, 2, 6, 0.0), 2, 2, s);
    assert_eq!(all, [a, b].concat());
}

#[test]
fn injection_is_agreed_by_every_rank_and_mixtures_keep_their_proportions() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), 40, 20, 8);
    let st = ReaderState { seed: 5, ..Default::default() };
    let mut plans = Vec::new();
    for rank in 0..2 {
        let mut r = reader(d.path(), 2, rank, 1, 4, 0.3);
        let mut kinds = Vec::new();
        let mut s = st;
        for step in 0..20 {
            let (reqs, after) = r.plan_step(step, s).unwrap();
            kinds.extend(reqs.iter().map(|q| (q.kind, q.micro)));
            s = after;
        }
        plans.push((kinds, s));
    }
    assert_eq!(plans[0].0, plans[1].0, "ranks disagree on injection");
    let injected = plans[0].0.iter().filter(|k| k.0 == idavlm_shards::reader::BatchKind::General).count();
    // 80 coin flips at p = 0.3: expect 24, allow a wide band.
    assert!((10..=40).contains(&injected), "{injected} injections in 80 flips");
    assert_eq!(plans[0].1.general_position, (injected * 2) as u64);
    // Mixture with fixed counts per epoch: 3 of source 0 for every 1 of source 1.
    let mut m = idavlm_shards::order::Mixture::new(
        1,
        vec![
            Source::open("id", &d.path().join("id")).unwrap().layout,
            Source::open("g", &d.path().join("general")).unwrap().layout,
        ],
        vec![30, 10],
        vec![0, 1],
    );
    let mut per = [0; 2];
    for g in 0..400 {
        per[m.at(g).0] += 1;
    }
    assert_eq!(per, [300, 100]);
}

#[test]
fn convert_round_trip_and_bad_samples() {
    let d = tempfile::tempdir().unwrap();
    let imgs = d.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    let png = |c: u8| {
        let img = image::RgbImage::from_pixel(20, 10, image::Rgb([c, 255 - c, 7]));
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
        buf.into_inner()
    };
    std::fs::write(imgs.join("a.png"), png(10)).unwrap();
    std::fs::write(imgs.join("b.png"), png(200)).unwrap();
    std::fs::write(imgs.join("broken.png"), b"not an image").unwrap();
    let good = serde_json::json!([
        {"id": "s1", "conversations": [{"from": "user", "value": "Ann is <img>a.png</img>\nIn the image: <img>b.png</img>\nWhere?"}, {"from": "assistant", "value": "left"}]},
        {"id": "s2", "conversations": [{"from": "user", "value": "Hello"}, {"from": "assistant", "value": "Hi <ref>x</ref>"}]},
    ]);
    let mut all = good.as_array().unwrap().clone();
    all.push(serde_json::json!({"id": "bad-img", "conversations": [{"from": "user", "value": "<img>broken.png</img>"}, {"from": "assistant", "value": "x"}]}));
    all.push(serde_json::json!({"id": "missing-img", "conversations": [{"from": "user", "value": "<img>nope.png</img>"}, {"from": "assistant", "value": "x"}]}));
    all.push(serde_json::json!({"id": "bad-turns", "conversations": [{"from": "user"}]}));
    let json = d.path().join("data.json");
    std::fs::write(&json, serde_json::to_vec(&all).unwrap()).unwrap();
    let tok = tokenizer();
    let opts = |on_bad| ConvertOptions {
        source: "t".into(),
        max_len: 2048,
        target_shard_bytes: 1 << 20,
        row_group_rows: 1,
        on_bad,
        workers: 2,
    };
    // fail: nothing written, every bad sample reported by id with the file.
    let out = d.path().join("fail");
    let r = convert(&json, &imgs, &out, tok, &opts(OnBad::Fail)).unwrap();
    assert!(r.manifest.is_none() && !out.join("index.json").exists());
    let bad: Vec<_> = r.bad.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(bad, ["bad-img", "missing-img", "bad-turns"]);
    assert!(r.bad[0].reason.contains("broken.png") && r.bad[1].reason.contains("nope.png"), "{:?}", r.bad);
    // skip: the good ones round-trip byte for byte.
    let out = d.path().join("ok");
    let r = convert(&json, &imgs, &out, tok, &opts(OnBad::Skip)).unwrap();
    assert_eq!(r.written, 2);
    let m = Manifest::load(&out).unwrap();
    assert_eq!(m.total_samples, 2);
    let mut samples = Vec::new();
    for sh in &m.shards {
        let f = out.join(&sh.file);
        for rg in 0..row_group_sizes(&f).unwrap().len() {
            samples.extend(read_row_group(&f, rg).unwrap());
        }
    }
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[0].id, "s1");
    assert_eq!(samples[0].conversations[0].value, good[0]["conversations"][0]["value"].as_str().unwrap());
    assert_eq!(samples[0].images[0].bytes, png(10));
    assert_eq!(samples[0].images[1].bytes, png(200));
    assert_eq!(samples[0].images[1].path, "b.png");
    assert_eq!(samples[1].images.len(), 0);
    // verify passes, then a truncated shard is named by verify and by the reader.
    let v = Command::new(bin("idavlm-shards")).arg("verify").arg(&out).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let shard = out.join(&m.shards[0].file);
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 20]).unwrap();
    let v = Command::new(bin("idavlm-shards")).arg("verify").arg(&out).output().unwrap();
    assert_eq!(v.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&v.stderr).contains(&m.shards[0].file));
    let e = Source::open("t", &out).unwrap_err().to_string();
    assert!(e.contains(&m.shards[0].file), "{e}");
    std::fs::remove_file(&shard).unwrap();
    let e = Source::open("t", &out).unwrap_err().to_string();
    assert!(e.contains("missing") && e.contains(&m.shards[0].file), "{e}");
}

#[test]
fn a_corrupt_image_at_training_time_is_skipped_or_fatal() {
    let d = tempfile::tempdir().unwrap();
    let imgs = d.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    let img = image::RgbImage::from_pixel(16, 16, image::Rgb([1, 2, 3]));
    img.save(imgs.join("a.png")).unwrap();
    let rows: Vec<_> = (0..4)
        .map(|i| serde_json::json!({"id": format!("s{i}"), "conversations": [{"from": "user", "value": "<img>a.png</img> what?"}, {"from": "assistant", "value": "a square"}]}))
        .collect();
    std::fs::write(d.path().join("d.json"), serde_json::to_vec(&rows).unwrap()).unwrap();
    let out = d.path().join("ds");
    let o = ConvertOptions {
        source: "t".into(),
        max_len: 2048,
        target_shard_bytes: 1 << 20,
        row_group_rows: 4,
        on_bad: OnBad::Fail,
        workers: 1,
    };
    convert(&d.path().join("d.json"), &imgs, &out, tokenizer(), &o).unwrap();
    // Corrupt one image inside the stored shard: rewrite the dataset with bad bytes for s2.
    let m = Manifest::load(&out).unwrap();
    let f = out.join(&m.shards[0].file);
    let mut samples = read_row_group(&f, 0).unwrap();
    samples[2].images[0].bytes = b"garbage".to_vec();
    let out2 = d.path().join("ds2");
    let mut w = idavlm_shards::format::DatasetWriter::create(&out2, "t", 1 << 20, 4).unwrap();
    for s in samples {
        w.push(s).unwrap();
    }
    w.finish().unwrap();
    for (policy, ok) in [(BadImagePolicy::Skip, true), (BadImagePolicy::Fail, false)] {
        let src = Source::open("t", &out2).unwrap();
        let r = Reader::new(
            vec![src],
            Arc::new(idavlm_shards::tokenizer::Tokenizer::load_default().unwrap()),
            LoadOptions { image_size: 28, max_len: 4096, bad_image: policy, workers: 1, resize: Default::default() },
            0,
            &[(0, 4)],
            None,
            StepShape { micro_batch: 4, accum: 1, world: 1, rank: 0, inject_probability: 0.0, packing: None },
        )
        .unwrap();
        let mut rx = r.stream(0, ReaderState::default(), 1);
        let got = rx.next_step();
        match (got, ok) {
            (Ok(step), true) => {
                assert_eq!(step.micro_batches[0].batch, 3);
                assert_eq!(step.micro_batches[0].dropped_bad_image, 1);
                assert!(!step.micro_batches[0].sample_ids.contains(&"s2".to_string()));
            }
            (Err(e), false) => assert!(e.to_string().contains("s2") && e.to_string().contains("shard-00000.parquet"), "{e}"),
            (r, _) => panic!("policy {policy:?}: unexpected {:?}", r.map(|s| s.micro_batches.len())),
        }
    }
}

#[test]
fn the_eval_split_in_parquet_equals_its_mmid_json() {
    let d = tempfile::tempdir().unwrap();
    idavlm_tests::synth(d.path(), 4, 0, 4);
    let root = d.path().join("eval");
    let json = idavlm_shards::mmid::read_bench(&root.join("mmid.json")).unwrap();
    let parquet = idavlm_shards::mmid::read_bench(&root.join("shards")).unwrap();
    assert_eq!(json.len(), 16);
    assert_eq!(json.len(), parquet.len());
    for (j, p) in json.iter().zip(&parquet) {
        assert_eq!((&j.id, &j.kind, &j.answer), (&p.id, &p.kind, &p.answer));
        assert_eq!(j.filled_question(), p.filled_question());
        let paths = j.image_paths().unwrap();
        assert_eq!(paths, p.image_paths().unwrap());
        assert!(!paths.is_empty());
        for path in &paths {
            // Embedded bytes are the files' bytes, read without the image folder.
            assert_eq!(p.image_bytes(path, Path::new("/nonexistent")).unwrap(), std::fs::read(root.join(path)).unwrap());
        }
    }
    // A JSON item without a field is an error naming the file and the item.
    let bad = d.path().join("bad.json");
    std::fs::write(&bad, r#"[{"id": "a", "type": "matching", "question": "q"}]"#).unwrap();
    let e = idavlm_shards::mmid::read_bench(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.json") && e.contains("item 0") && e.contains("answer"), "{e}");
}

/// W2 (PERF.md): the 585 MM-ID items' real lengths pack into 4096-token micro-batches with 96.1% of the
/// tokens real (162 micro-batches; the lower bound is 156; the original pads each to 2048: 53%). Issue
/// #15 asks for 97%: this guards the packer's current figure until a better one lands.
#[test]
fn w2_lengths_pack_at_96_percent_or_better() {
    let f = idavlm_tests::root().join("../shared/bench/w2_lengths.json");
    let Ok(text) = std::fs::read_to_string(&f) else {
        eprintln!("skipped: {} not found (the shared contract folder sits beside the repository)", f.display());
        return;
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let img = v["image_tokens"].as_u64().unwrap() as usize;
    let lengths: Vec<usize> = v["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let s: Vec<usize> = s.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            s[0] * img + s[1] + s[2]
        })
        .collect();
    assert_eq!(lengths.len(), 585);
    let p = idavlm_shards::pack::pack(&lengths, 4096, 1000);
    let e = p.efficiency(&lengths, 4096);
    assert!(p.too_long.is_empty() && e >= 0.96, "efficiency {e}");
    eprintln!("W2: {} micro-batches of 4096, efficiency {:.2}%", p.bins.len(), 100.0 * e);
}

/// Packing plans with each shard's `num_tokens` column (no image bytes read, no tokenising on every
/// rank); a shard whose column disagrees with the tokeniser is an error naming the sample and the shard
/// when that sample is used, not a silently over-full micro-batch.
#[test]
fn packing_plans_by_num_tokens_and_a_stale_count_is_an_error_naming_the_sample() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), 16, 4, 3);
    let src = d.path().join("id");
    let m = Manifest::load(&src).unwrap();
    let tok = Arc::new(idavlm_shards::tokenizer::Tokenizer::load_default().unwrap());
    let packed = |dir: &Path| {
        let s = Source::open("id", dir).unwrap();
        let n = s.layout.len();
        Reader::new(
            vec![s],
            tok.clone(),
            LoadOptions {
                image_size: 28,
                max_len: 4096,
                bad_image: BadImagePolicy::Fail,
                workers: 1,
                resize: Default::default(),
            },
            5,
            &[(0, n)],
            None,
            StepShape {
                micro_batch: 1,
                accum: 2,
                world: 1,
                rank: 0,
                inject_probability: 0.0,
                packing: Some(idavlm_shards::reader::PackShape { tokens: 4096, window: 16 }),
            },
        )
        .unwrap()
    };
    // As written: every packed micro-batch's length is the sum of its samples' num_tokens.
    let mut r = packed(&src);
    let (reqs, after) = r.plan_step(0, ReaderState { seed: 5, ..Default::default() }).unwrap();
    let mut stale_id = None;
    for req in &reqs {
        let mb = r.loader.build(req, 0, after).unwrap();
        let counts: usize = req.samples.iter().map(|&(s, loc)| r.loader.sample(s, loc).unwrap().num_tokens as usize).sum();
        assert_eq!(mb.seq_lens.iter().sum::<usize>(), counts);
        assert!(counts <= 4096);
        stale_id.get_or_insert(mb.sample_ids[0].clone());
    }
    // One sample's count edited: planning believes it, the micro-batch that uses it fails clearly.
    let stale_id = stale_id.unwrap();
    let out = d.path().join("stale");
    // Rewritten in the same layout (one shard, row groups of 3), so the order and the plan are the same.
    assert_eq!(m.shards.len(), 1);
    let mut w = idavlm_shards::format::DatasetWriter::create(&out, "id", 64 << 20, 3).unwrap();
    for mut s in Source::open("id", &src).unwrap().read_all().unwrap() {
        if s.id == stale_id {
            s.num_tokens -= 1;
        }
        w.push(s).unwrap();
    }
    w.finish().unwrap();
    let mut r = packed(&out);
    let (reqs, after) = r.plan_step(0, ReaderState { seed: 5, ..Default::default() }).unwrap();
    let errors: Vec<String> = reqs.iter().filter_map(|q| r.loader.build(q, 0, after).err()).map(|e| e.to_string()).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains(&format!("{stale_id:?}")) && errors[0].contains("num_tokens says") && errors[0].contains("shard-"),
        "{}",
        errors[0]
    );
}
