use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use idavlm::model::weights::{load_hf, save_hf, save_params};
use idavlm::model::{count_params, ModelConfig, ModelInput, ParamSet, QwenVl};
use idavlm_shards::chat::{encode_conversation, Overflow, Turn};
use idavlm_shards::tokenizer::ENDOFTEXT;
use idavlm_tests::{python, python_script, tokenizer};
use safetensors::tensor::{Dtype, TensorView};
use tch::{Device, Kind, Tensor};

#[test]
fn full_size_parameter_counts_match_the_spec() {
    let mut cfg = ModelConfig::qwen_vl_chat();
    let c = count_params(&cfg);
    assert_eq!(c.llm, 7_721_324_544);
    assert_eq!(c.vit, 1_842_770_688);
    assert_eq!(c.resampler, 76_054_528);
    assert_eq!(c.post_proj, 16_785_408);
    assert_eq!(c.whole_model, 9_656_935_168);
    assert_eq!(c.trainable_finetune, 7_797_379_072);
    cfg.id_former = true;
    let c = count_params(&cfg);
    assert_eq!(c.id_former, 67_125_248);
    assert_eq!(c.trainable_finetune, 7_864_504_320);
}

#[test]
fn libtorch_works_from_the_build() {
    let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
    let b = a.matmul(&a);
    assert_eq!(Vec::<f32>::try_from(b.view([-1])).unwrap(), vec![7.0, 10.0, 15.0, 22.0]);
}

pub(crate) fn tiny_id() -> ModelConfig {
    let mut c = ModelConfig::tiny();
    c.id_former = true;
    c
}

/// A batch with a reference + test row and a general row.
pub(crate) fn batch(cfg: &ModelConfig) -> ModelInput {
    let tok = tokenizer();
    let rows = [
        vec![
            Turn {
                from: "user".into(),
                value: "Bob is <img>r</img>\nIn the image: <img>t</img>\nIdentify Bob with grounding.".into(),
            },
            Turn { from: "assistant".into(), value: "<ref>Bob</ref><box>(10,20),(300,400)</box>".into() },
        ],
        vec![
            Turn { from: "user".into(), value: "<img>g</img>\nHow many shapes?".into() },
            Turn { from: "assistant".into(), value: "There are 3 shapes.".into() },
        ],
    ];
    let enc: Vec<_> = rows.iter().map(|t| encode_conversation(tok, "t", t, 2048, Overflow::Reject).unwrap()).collect();
    let s = enc.iter().map(|e| e.input_ids.len()).max().unwrap();
    let (mut ids, mut labels, mut img_rows, mut starts, mut roles) = (vec![], vec![], vec![], vec![], vec![]);
    for (r, e) in enc.iter().enumerate() {
        ids.extend(e.input_ids.iter().map(|&t| t as i64));
        ids.extend(std::iter::repeat_n(ENDOFTEXT as i64, s - e.input_ids.len()));
        labels.extend(&e.labels);
        labels.extend(std::iter::repeat_n(-100i64, s - e.labels.len()));
        for (k, &st) in e.image_starts.iter().enumerate() {
            img_rows.push(r);
            starts.push(st);
            roles.push(e.image_roles[k]);
        }
    }
    let n = img_rows.len() as i64;
    let size = cfg.visual.image_size;
    tch::manual_seed(5);
    ModelInput {
        input_ids: Tensor::from_slice(&ids).view([2, s as i64]),
        labels: Tensor::from_slice(&labels).view([2, s as i64]),
        pixels: Tensor::randn([n, 3, size, size], (Kind::Float, Device::Cpu)),
        image_groups: img_rows.clone(),
        image_rows: img_rows,
        image_starts: starts,
        image_roles: roles,
        seq_lens: vec![],
        supervised: Some(ModelInput::supervised_positions(&labels, 2, s, Device::Cpu)),
    }
}

fn write_inputs(input: &ModelInput, path: &Path) {
    let raw = |t: &Tensor, k: Kind| {
        let t = t.to_kind(k).contiguous();
        let mut v = vec![0u8; t.numel() * k.elt_size_in_bytes()];
        t.copy_data_u8(&mut v, t.numel());
        v
    };
    let ids = raw(&input.input_ids, Kind::Int64);
    let labels = raw(&input.labels, Kind::Int64);
    let px = raw(&input.pixels, Kind::Float);
    let shape = |t: &Tensor| t.size().iter().map(|&d| d as usize).collect::<Vec<_>>();
    let views = vec![
        ("input_ids", TensorView::new(Dtype::I64, shape(&input.input_ids), &ids).unwrap()),
        ("labels", TensorView::new(Dtype::I64, shape(&input.labels), &labels).unwrap()),
        ("pixels", TensorView::new(Dtype::F32, shape(&input.pixels), &px).unwrap()),
    ];
    safetensors::serialize_to_file(views, None, path).unwrap();
}

pub(crate) fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).norm().double_value(&[]) / b.norm().double_value(&[])
}

/// Random values everywhere, the ID-Former's zero out_proj included, so that its path is exercised.
pub(crate) fn random_params(cfg: &ModelConfig) -> ParamSet {
    let p = ParamSet::init(cfg, Device::Cpu, Kind::Float, 3);
    tch::no_grad(|| {
        for (s, t) in p.iter() {
            if s.name.contains("attn1.out_proj") || s.name.ends_with(".bias") {
                let mut t = t.shallow_clone();
                t.copy_(&(Tensor::randn(s.shape.as_slice(), (Kind::Float, Device::Cpu)) * 0.05));
            }
        }
    });
    p
}

#[test]
fn logits_and_loss_match_an_independent_pytorch_reference() {
    let cfg = tiny_id();
    let dir = tempfile::tempdir().unwrap();
    let params = random_params(&cfg);
    save_params(&params, dir.path(), Kind::Float, usize::MAX).unwrap();
    let input = batch(&cfg);
    write_inputs(&input, &dir.path().join("inputs.safetensors"));
    let cfg_json = dir.path().join("config.json");
    std::fs::write(&cfg_json, serde_json::to_vec(&cfg).unwrap()).unwrap();
    python_script(
        "qwenvl_ref.py",
        [
            cfg_json.clone(),
            dir.path().join("model.safetensors"),
            dir.path().join("inputs.safetensors"),
            dir.path().join("out.safetensors"),
        ],
    );
    let refs = Tensor::read_safetensors(dir.path().join("out.safetensors")).unwrap();
    let refs: HashMap<String, Tensor> = refs.into_iter().collect();
    let model = QwenVl::new(&cfg, &params);
    let logits = tch::no_grad(|| model.forward_logits(&input));
    let loss = QwenVl::loss(&logits, &input.labels);
    let e = rel_err(&logits, &refs["logits"]);
    assert!(e <= 1e-4, "logits relative error {e}");
    let (a, b) = (loss.double_value(&[]), refs["loss"].double_value(&[0]));
    assert!(((a - b) / b).abs() <= 1e-4, "loss {a} vs reference {b}");
    // The trainer's loss (lm_head only at supervised positions) equals the full one.
    let x = {
        let mut x = model.stem.forward(&input);
        let rope = QwenVl::rope(&cfg, input.input_ids.size()[1], Device::Cpu);
        for b in &model.blocks {
            x = b.forward(&x, &rope, None);
        }
        x
    };
    // With the supervised positions made on the host (the trainer's inputs) and found on the device.
    let l2 = tch::no_grad(|| model.head.loss(&x, &input.labels, input.supervised.as_ref())).double_value(&[]);
    assert!(((l2 - a) / a).abs() < 1e-5, "{l2} vs {a}");
    let l3 = tch::no_grad(|| model.head.loss(&x, &input.labels, None)).double_value(&[]);
    assert_eq!(l2, l3);
}

#[test]
fn a_fresh_id_former_leaves_the_logits_unchanged() {
    let cfg_on = tiny_id();
    let cfg_off = ModelConfig::tiny();
    let on = ParamSet::init(&cfg_on, Device::Cpu, Kind::Float, 9);
    let off = ParamSet::from_tensors(
        idavlm::model::param_specs(&cfg_off),
        idavlm::model::param_specs(&cfg_off).iter().map(|s| on.get(&s.name).shallow_clone()).collect(),
    );
    let input = batch(&cfg_on);
    let a = tch::no_grad(|| QwenVl::new(&cfg_on, &on).forward_logits(&input));
    let b = tch::no_grad(|| QwenVl::new(&cfg_off, &off).forward_logits(&input));
    assert!(a.equal(&b), "logits differ by {}", (&a - &b).abs().max().double_value(&[]));
}

#[test]
fn save_and_load_round_trip_bit_exact_sharded() {
    let cfg = tiny_id();
    let dir = tempfile::tempdir().unwrap();
    let p = random_params(&cfg);
    save_params(&p, dir.path(), Kind::Float, 8 << 20).unwrap();
    assert!(dir.path().join("model.safetensors.index.json").is_file(), "small shards force an index");
    let (q, report) = load_hf(dir.path(), &cfg, Device::Cpu, Kind::Float).unwrap();
    assert!(report.created_id_former.is_empty());
    for ((s, a), (_, b)) in p.iter().zip(q.iter()) {
        assert!(a.equal(b), "{} differs", s.name);
    }
}

#[test]
fn a_python_written_checkpoint_loads_and_missing_keys_fail_by_name() {
    let cfg_off = ModelConfig::tiny();
    let dir = tempfile::tempdir().unwrap();
    let p = ParamSet::init(&cfg_off, Device::Cpu, Kind::Float, 4);
    save_params(&p, dir.path(), Kind::Float, usize::MAX).unwrap();
    // Python re-writes it in bf16 with its own safetensors writer, as HF checkpoints are.
    let py = dir.path().join("py");
    std::fs::create_dir_all(&py).unwrap();
    let script = "import sys\nfrom safetensors.torch import load_file, save_file\n\
w = load_file(sys.argv[1])\nsave_file({k: v.bfloat16().contiguous() for k, v in w.items()}, sys.argv[2], metadata={'format': 'pt'})\n";
    let out = Command::new(python())
        .args(["-c", script])
        .arg(dir.path().join("model.safetensors"))
        .arg(py.join("model.safetensors"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Loading the ID-Former config from a checkpoint without it creates attn1 (zero out_proj).
    let (q, report) = load_hf(&py, &tiny_id(), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(report.created_id_former.len(), 4);
    assert!(q.get("transformer.visual.attn_pool.attn1.out_proj.weight").abs().max().double_value(&[]) == 0.0);
    let w = "transformer.h.1.mlp.w2.weight";
    assert!(q.get(w).equal(&p.get(w).to_kind(Kind::BFloat16).to_kind(Kind::Float)));
    // A missing non-ID-Former key fails with its name.
    let named: Vec<(String, Tensor)> =
        p.iter().filter(|(s, _)| s.name != w).map(|(s, t)| (s.name.clone(), t.shallow_clone())).collect();
    let m = dir.path().join("missing");
    save_hf(&named, &m, Kind::Float, usize::MAX).unwrap();
    let err = load_hf(&m, &cfg_off, Device::Cpu, Kind::Float).err().expect("must fail");
    assert!(err.to_string().contains(w), "{err}");
    // A truncated file is a clear error naming it.
    let f = m.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_hf(&m, &cfg_off, Device::Cpu, Kind::Float).err().expect("must fail");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn kv_cache_decoding_matches_the_full_forward() {
    let cfg = ModelConfig::tiny();
    let p = ParamSet::init(&cfg, Device::Cpu, Kind::Float, 2);
    let m = QwenVl::new(&cfg, &p);
    let ids = Tensor::from_slice(&[9707i64, 11, 1879, 0, 358, 1079, 264, 1273]).view([1, 8]);
    let full = tch::no_grad(|| {
        let mut x = m.stem.embed(&ids, None, &[], &[]);
        let rope = QwenVl::rope(&cfg, 8, Device::Cpu);
        for b in &m.blocks {
            x = b.forward(&x, &rope, None);
        }
        m.head.forward(&x)
    });
    let mut caches: Vec<_> = (0..cfg.num_hidden_layers).map(|_| None).collect();
    let mut steps = Vec::new();
    tch::no_grad(|| {
        let x = m.stem.embed(&ids.narrow(1, 0, 5), None, &[], &[]);
        steps.push(m.decode_step(x, &m.rope_infer(0, 5, 1.0), &mut caches));
        for p in 5..8 {
            let x = m.stem.embed(&ids.narrow(1, p, 1), None, &[], &[]);
            steps.push(m.decode_step(x, &m.rope_infer(p, 1, 1.0), &mut caches));
        }
    });
    let inc = Tensor::cat(&steps, 1);
    assert!(rel_err(&inc, &full) < 1e-5, "{}", rel_err(&inc, &full));
    assert_eq!(m.ntk_alpha(2048), 1.0);
    assert_eq!(m.ntk_alpha(3000), 3.0);
    assert_eq!(m.ntk_alpha(5000), 7.0);
}

#[test]
fn preprocessing_matches_pil() {
    use idavlm_shards::preprocess::{decode_rgb8, resize_rgb8, ResizeOrder};
    let dir = tempfile::tempdir().unwrap();
    idavlm_tests::synth(dir.path(), 10, 0, 8);
    let mut imgs: Vec<_> =
        std::fs::read_dir(dir.path().join("eval/images")).unwrap().map(|e| e.unwrap().path()).take(12).collect();
    // Random-noise PNGs at the boundary shapes of both pass orders (448 output): narrower and taller
    // (vertical first under Pillow 13), wider and shorter, equal sides, upscaling both ways, one-pixel
    // sides, and the rule's edge (height shrinking by exactly / just over twice the width's shrink).
    let shapes = [
        (400, 600),
        (440, 460),
        (300, 900),
        (600, 400),
        (448, 900),
        (900, 448),
        (448, 448),
        (600, 600),
        (300, 300),
        (40, 64),
        (100, 50),
        (1, 900),
        (900, 1),
        (1, 1),
        (1, 448),
        (548, 648),
        (548, 649),
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for (w, h) in shapes {
        let px: Vec<u8> = (0..w * h * 3)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let f = dir.path().join(format!("noise-{w}x{h}.png"));
        image::save_buffer(&f, &px, w as u32, h as u32, image::ExtendedColorType::Rgb8).unwrap();
        imgs.push(f);
    }
    let args = [std::path::PathBuf::from("448"), dir.path().to_path_buf()].into_iter().chain(imgs.iter().cloned());
    let (out, _) = python_script("pil_resize.py", args);
    assert_eq!(out.trim(), "13.0.0", "the venv's Pillow is the pinned one");
    let mut orders_seen = std::collections::BTreeSet::new();
    for f in &imgs {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let (rgb, w, h) = decode_rgb8(&std::fs::read(f).unwrap(), "t").unwrap();
        // PNG decodes identically, so the resize must be bit-exact; JPEG decoders may differ by rounding.
        let png = f.extension().is_some_and(|e| e == "png");
        for (order, suffix) in [(ResizeOrder::Pillow13, "rgb"), (ResizeOrder::Pillow12, "h1.rgb")] {
            let pil = std::fs::read(dir.path().join(format!("{name}.{suffix}"))).unwrap();
            let ours = resize_rgb8(&rgb, w, h, 448, 448, order);
            if png {
                assert_eq!(ours, pil, "{name} {order:?}");
                orders_seen.insert(order.horizontal_first(w, h, 448, 448));
            } else {
                let mad = ours.iter().zip(&pil).map(|(&a, &b)| (a as f64 - b as f64).abs()).sum::<f64>() / ours.len() as f64;
                assert!(mad < 1.0, "{name} {order:?}: mean abs difference {mad} (of 255)");
            }
        }
    }
    assert_eq!(orders_seen.len(), 2, "both pass orders covered");
    // The two orders do differ where Pillow 13 goes vertical first (the 400x600 case).
    let (rgb, w, h) = decode_rgb8(&std::fs::read(dir.path().join("noise-400x600.png")).unwrap(), "t").unwrap();
    assert_ne!(
        resize_rgb8(&rgb, w, h, 448, 448, ResizeOrder::Pillow13),
        resize_rgb8(&rgb, w, h, 448, 448, ResizeOrder::Pillow12)
    );
}

/// A random tiny ID model's config and weights, and a synthetic dataset with its held-out split.
fn generation_fixture() -> (ModelConfig, ParamSet, tempfile::TempDir) {
    let cfg = tiny_id();
    let p = random_params(&cfg);
    let d = tempfile::tempdir().unwrap();
    idavlm_tests::synth(d.path(), 4, 0, 4);
    (cfg, p, d)
}

#[test]
fn greedy_generation_with_the_kv_cache_equals_recomputing_everything() {
    let (cfg, p, d) = generation_fixture();
    let m = QwenVl::new(&cfg, &p);
    let tok = tokenizer();
    let items = idavlm::infer::read_bench(&d.path().join("eval/mmid.json")).unwrap();
    let item = items.iter().find(|i| i.kind == "location").unwrap();
    let prompt = item.filled_question();
    let opts = idavlm::infer::GenOptions { max_new_tokens: 12, top_p: None, seed: 1, resize: Default::default() };
    let (_, cached) = idavlm::infer::generate(&m, tok, &prompt, &d.path().join("eval"), &opts).unwrap();
    // Without a cache: the whole sequence through the model for every new token.
    let turns = vec![Turn { from: "user".into(), value: prompt.clone() }];
    let enc = encode_conversation(tok, "p", &turns, usize::MAX, Overflow::Reject).unwrap();
    let mut ids: Vec<i64> = enc.input_ids.iter().map(|&t| t as i64).collect();
    ids.push(151_644);
    ids.extend(tok.encode("assistant").iter().map(|&t| t as i64));
    ids.push(198);
    let size = cfg.visual.image_size as usize;
    let mut px = Vec::new();
    for path in &enc.image_paths {
        px.extend(
            idavlm_shards::preprocess::preprocess_image(
                &std::fs::read(d.path().join("eval").join(path)).unwrap(),
                size,
                Default::default(),
                path,
            )
            .unwrap(),
        );
    }
    let n = enc.image_paths.len() as i64;
    let mut full = Vec::new();
    for _ in 0..12 {
        let l = ids.len() as i64;
        let input = ModelInput {
            input_ids: Tensor::from_slice(&ids).view([1, l]),
            labels: Tensor::full([1, l], -100, (Kind::Int64, Device::Cpu)),
            pixels: Tensor::from_slice(&px).view([n, 3, size as i64, size as i64]),
            image_rows: vec![0; n as usize],
            image_starts: enc.image_starts.clone(),
            image_roles: enc.image_roles.clone(),
            image_groups: vec![0; n as usize],
            seq_lens: vec![],
            supervised: None,
        };
        let logits = tch::no_grad(|| m.forward_logits(&input));
        let next = logits.select(1, l - 1).argmax(-1, false).int64_value(&[0]);
        if next == 151_645 || next == 151_644 {
            break;
        }
        full.push(next as u32);
        ids.push(next);
    }
    assert_eq!(cached, full);
    assert!(!full.is_empty());
}

#[test]
fn batched_generation_equals_one_prompt_at_a_time() {
    let (cfg, p, d) = generation_fixture();
    let m = QwenVl::new(&cfg, &p);
    let tok = tokenizer();
    let root = d.path().join("eval");
    let items = idavlm::infer::read_bench(&root.join("mmid.json")).unwrap();
    // One item of each type: prompts of different lengths and image counts, so rows are left-padded.
    let mut picked: Vec<&idavlm::infer::Item> = Vec::new();
    for kind in ["matching", "location", "QA_singleimage", "caption_singleimage"] {
        picked.push(items.iter().find(|i| i.kind == kind).unwrap());
    }
    let opts = idavlm::infer::GenOptions { max_new_tokens: 10, top_p: None, seed: 1, resize: Default::default() };
    let batched = idavlm::infer::generate_batch(&m, tok, &picked, &root, &opts).unwrap();
    let lens: std::collections::BTreeSet<usize> = picked.iter().map(|i| i.filled_question().len()).collect();
    assert!(lens.len() > 1, "the prompts should differ in length");
    for (item, (_, got)) in picked.iter().zip(&batched) {
        let (_, alone) = idavlm::infer::generate_batch(&m, tok, &[*item], &root, &opts).unwrap().pop().unwrap();
        assert_eq!(got, &alone, "item {}", item.id);
    }
    // The Parquet form of the same split answers the same (images from the shard, not the folder).
    let parquet = idavlm::infer::read_bench(&root.join("shards")).unwrap();
    let by_id: std::collections::HashMap<&str, &idavlm::infer::Item> = parquet.iter().map(|i| (i.id.as_str(), i)).collect();
    let pq: Vec<&idavlm::infer::Item> = picked.iter().map(|i| by_id[i.id.as_str()]).collect();
    let elsewhere = tempfile::tempdir().unwrap();
    let from_parquet = idavlm::infer::generate_batch(&m, tok, &pq, elsewhere.path(), &opts).unwrap();
    assert_eq!(from_parquet.iter().map(|x| &x.1).collect::<Vec<_>>(), batched.iter().map(|x| &x.1).collect::<Vec<_>>());
}
