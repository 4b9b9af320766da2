//! Qwen3-VL against transformers 5.24's own `Qwen3VLForConditionalGeneration` (the oracle, on tiny
//! random checkpoints saved with `save_pretrained`): positions, logits, loss and every gradient in f32,
//! the ID-Former at step 0, and the export read back by `from_pretrained`.

use std::collections::HashMap;
use std::path::Path;

use idavlm::model::qwen3vl::{self, params::param_specs, Input, Qwen3Vl, Qwen3VlConfig, Sample};
use idavlm_shards::qwen3vl::positions::Grid;
use idavlm_shards::qwen3vl::{IMAGE_PAD, IM_END, IM_START, VISION_END, VISION_START};
use idavlm_tests::python_script;
use safetensors::tensor::{Dtype, TensorView};
use tch::{Device, Kind, Tensor};

enum Piece {
    Text(Vec<u32>),
    Image(Grid),
}

/// Rows of the template's shape: ChatML turns, images as `<|vision_start|>` pads `<|vision_end|>`;
/// the second row gives "Name is <image>" references and a test image (the ID-Former's roles).
fn rows() -> Vec<Vec<Piece>> {
    use Piece::*;
    let g = |h, w| Image(Grid { t: 1, h, w });
    vec![
        vec![
            Text(vec![IM_START, 872, 198, 785, 2168]),
            g(4, 6),
            Text(vec![323, 1052]),
            g(6, 4),
            Text(vec![13, IM_END, 198, IM_START, 77091, 198, 9707, 11, 1879, 13, IM_END, 198]),
        ],
        vec![
            Text(vec![IM_START, 872, 198, 61686, 374, 220]),
            g(4, 4),
            Text(vec![13, 3555]),
            g(8, 4),
            Text(vec![30, IM_END, 198, IM_START, 77091, 198, 61686, IM_END, 198]),
        ],
    ]
}

/// Flattened ids, labels (the assistant answers, as §14.2), grids and random patch rows of each row,
/// rows padded with text to one length.
fn host_batch() -> Vec<(Vec<u32>, Vec<i64>, Vec<Grid>, Vec<f32>)> {
    let mut out = Vec::new();
    tch::manual_seed(11);
    for row in rows() {
        let (mut ids, mut grids) = (vec![], vec![]);
        for p in row {
            match p {
                Piece::Text(t) => ids.extend(t),
                Piece::Image(g) => {
                    ids.push(VISION_START);
                    ids.extend(std::iter::repeat_n(IMAGE_PAD, g.tokens(2)));
                    ids.push(VISION_END);
                    grids.push(g);
                }
            }
        }
        out.push((ids, grids));
    }
    let len = out.iter().map(|(i, _)| i.len()).max().unwrap();
    out.into_iter()
        .map(|(mut ids, grids)| {
            ids.resize(len, 151_643);
            // Supervise what follows the last "<|im_start|>assistant\n".
            let start = (2..ids.len()).rev().find(|&i| ids[i - 2] == IM_START && ids[i - 1] == 77091).unwrap() + 1;
            let labels = ids.iter().enumerate().map(|(i, &t)| if i >= start && t != 151_643 { t as i64 } else { -100 }).collect();
            let n: i64 = grids.iter().map(|g| g.t * g.h * g.w).sum();
            let px = Tensor::randn([n, 1536], (Kind::Float, Device::Cpu));
            (ids, labels, grids, Vec::<f32>::try_from(px.view([-1])).unwrap())
        })
        .collect()
}

fn input(batch: &[(Vec<u32>, Vec<i64>, Vec<Grid>, Vec<f32>)]) -> Input {
    let samples: Vec<Sample> =
        batch.iter().map(|(i, l, g, p)| Sample { ids: i, labels: l, grids: g, pixels: p }).collect();
    Input::from_samples(&samples, Device::Cpu).unwrap()
}

fn write_inputs(inp: &Input, path: &Path) {
    let bytes = |t: &Tensor, k: Kind| -> Vec<u8> {
        let t = t.to_kind(k).contiguous();
        let n = t.numel() * k.elt_size_in_bytes();
        let mut v = vec![0u8; n];
        t.copy_data_u8(&mut v, t.numel());
        v
    };
    let grid: Vec<i64> = inp.grids.iter().flat_map(|g| [g.t, g.h, g.w]).collect();
    let grid = Tensor::from_slice(&grid).view([-1, 3]);
    let tensors = [
        ("input_ids", &inp.input_ids, Kind::Int64, Dtype::I64),
        ("labels", &inp.labels, Kind::Int64, Dtype::I64),
        ("pixel_values", &inp.pixels, Kind::Float, Dtype::F32),
        ("image_grid_thw", &grid, Kind::Int64, Dtype::I64),
    ];
    let data: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t, k, d)| (n.to_string(), t.size().iter().map(|&x| x as usize).collect(), *d, bytes(t, *k)))
        .collect();
    let views: Vec<(String, TensorView)> =
        data.iter().map(|(n, s, d, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).abs().max().double_value(&[]);
    d / b.abs().max().double_value(&[]).max(1e-30)
}

fn refs(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

/// A tiny checkpoint made by transformers, read back as our config.
fn checkpoint(dir: &Path, tied: bool) -> Qwen3VlConfig {
    let mut args = vec!["make".to_string(), dir.display().to_string()];
    if !tied {
        args.push("--untied".into());
    }
    python_script("qwen3vl_ref.py", args);
    let cfg = Qwen3VlConfig::from_file(&dir.join("config.json")).unwrap();
    assert_eq!(cfg.tie_word_embeddings, tied);
    cfg
}

fn parity(tied: bool) {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let mut cfg = checkpoint(&ck, tied);
    // Our tiny preset is the oracle's shape.
    let mut tiny = Qwen3VlConfig::tiny();
    tiny.tie_word_embeddings = tied;
    assert_eq!(cfg, tiny);
    cfg.id_former = false;
    let params = Qwen3Vl::load(&ck, &cfg, Device::Cpu, Kind::Float).unwrap();
    for t in &params.tensors {
        let _ = t.shallow_clone().set_requires_grad(true);
    }
    let inp = input(&host_batch());
    write_inputs(&inp, &dir.path().join("in.safetensors"));
    python_script(
        "qwen3vl_ref.py",
        ["run".into(), ck.display().to_string(), dir.path().join("in.safetensors").display().to_string(), dir.path().join("out.safetensors").display().to_string()],
    );
    let r = refs(&dir.path().join("out.safetensors"));
    // Positions: ours from the data path, transformers' from get_rope_index.
    assert_eq!(Vec::<i64>::try_from(inp.positions.view([-1])).unwrap(), Vec::<i64>::try_from(r["position_ids"].view([-1])).unwrap());
    let mut model = Qwen3Vl::new(&cfg, &params);
    model.train_vision = true;
    let logits = model.forward_logits(&inp);
    let e = rel(&logits, &r["logits"]);
    assert!(e <= 1e-5, "logits relative error {e}");
    let loss = idavlm::model::QwenVl::loss(&logits, &inp.labels);
    let (a, b) = (loss.double_value(&[]), r["loss"].double_value(&[0]));
    assert!(((a - b) / b).abs() <= 1e-5, "loss {a} vs {b}");
    loss.backward();
    let mut checked = 0;
    let mut worst = (0.0, String::new());
    for (s, t) in params.iter() {
        let want = &r[&format!("grad.{}", s.name)];
        let e = rel(&t.grad(), want);
        assert!(e <= 1e-5, "{}: gradient relative error {e}", s.name);
        if e > worst.0 {
            worst = (e, s.name.clone());
        }
        checked += 1;
    }
    eprintln!("tied {tied}: logits {:.2e}, loss {a} vs {b}, worst gradient {:.2e} ({})", rel(&logits, &r["logits"]), worst.0, worst.1);
    // Every parameter of transformers' model has a gradient, and the table names each once.
    assert_eq!(checked, r.keys().filter(|k| k.starts_with("grad.")).count());
    assert_eq!(checked, param_specs(&cfg).len());
}

#[test]
fn tied_qwen3vl_logits_and_gradients_equal_transformers() {
    parity(true);
}

#[test]
fn untied_qwen3vl_logits_and_gradients_equal_transformers() {
    parity(false);
}

/// The ID-Former's zero out_proj leaves the model equal to the base at step 0 (bit for bit), and a
/// trained one changes only the rows after the test image; the export loads in transformers (the
/// ID-Former beside it), and gives our base logits.
#[test]
fn id_former_starts_as_the_base_and_the_export_loads_in_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let base_cfg = checkpoint(&ck, false);
    let base = Qwen3Vl::load(&ck, &base_cfg, Device::Cpu, Kind::Float).unwrap();
    let inp = input(&host_batch());
    let base_logits = tch::no_grad(|| Qwen3Vl::new(&base_cfg, &base).forward_logits(&inp));
    let mut cfg = base_cfg.clone();
    cfg.id_former = true;
    let with = Qwen3Vl::load(&ck, &cfg, Device::Cpu, Kind::Float).unwrap();
    assert_eq!(idavlm::model::qwen3vl::params::count_params(&cfg).id_former, 4 * 64 * 64 + 4 * 64);
    let logits = tch::no_grad(|| Qwen3Vl::new(&cfg, &with).forward_logits(&inp));
    assert!(logits.equal(&base_logits), "a fresh ID-Former changed the logits");
    // A trained (non-zero) out_proj moves the second row from its test image on, and nothing before.
    tch::no_grad(|| {
        let i = with.position("model.visual.id_former.out_proj.weight").unwrap();
        let mut w = with.tensors[i].shallow_clone();
        w.copy_(&(Tensor::randn(w.size(), (Kind::Float, Device::Cpu)) * 0.1));
    });
    let moved = tch::no_grad(|| Qwen3Vl::new(&cfg, &with).forward_logits(&inp));
    assert!(moved.get(0).equal(&base_logits.get(0)), "row 0 has no test image");
    let ids = Vec::<i64>::try_from(inp.input_ids.get(1)).unwrap();
    let test_start = ids.iter().enumerate().filter(|(_, &t)| t == VISION_START as i64).nth(1).unwrap().0 as i64;
    assert!(moved.get(1).narrow(0, 0, test_start + 1).equal(&base_logits.get(1).narrow(0, 0, test_start + 1)));
    assert!(!moved.get(1).equal(&base_logits.get(1)));
    // Export: the HF folder without the ID-Former, read by from_pretrained; the ID-Former read back by us.
    let out = dir.path().join("export");
    let extra = qwen3vl::export_hf(&cfg, &with, &out, Kind::Float, usize::MAX).unwrap();
    assert_eq!(extra.len(), 4);
    let cfg_json: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert!(!cfg_json.to_string().contains("id_former"));
    write_inputs(&inp, &dir.path().join("in.safetensors"));
    python_script(
        "qwen3vl_ref.py",
        ["logits".into(), out.display().to_string(), dir.path().join("in.safetensors").display().to_string(), dir.path().join("hf.safetensors").display().to_string()],
    );
    let hf = refs(&dir.path().join("hf.safetensors"));
    let e = rel(&base_logits, &hf["logits"]);
    assert!(e <= 1e-5, "exported logits relative error {e}");
    let back = Qwen3Vl::load(&out, &cfg, Device::Cpu, Kind::Float).unwrap();
    let again = tch::no_grad(|| Qwen3Vl::new(&cfg, &back).forward_logits(&inp));
    assert!(again.equal(&moved), "the ID-Former beside the export did not come back");
}

/// The image path against transformers' processor (PIL backend, Qwen3-VL's preprocessor values):
/// grids, token counts and pixel values for sizes that upscale, downscale under max_pixels, keep, and
/// round half to even (336x1040 -> 320x1024).
#[test]
fn image_grids_and_pixels_equal_the_processors() {
    use idavlm_shards::qwen3vl::image::patchify_rgb8;
    let dir = tempfile::tempdir().unwrap();
    let sizes = ["1040x336", "640x480", "100x100", "37x1000", "3000x2000", "97x211"];
    let (min, max) = (65_536usize, 1_048_576usize);
    let mut args: Vec<String> = vec!["images".into(), dir.path().display().to_string(), min.to_string(), max.to_string()];
    args.extend(sizes.iter().map(|s| s.to_string()));
    python_script("qwen3vl_ref.py", args);
    for (n, size) in sizes.iter().enumerate() {
        let bytes = std::fs::read(dir.path().join(format!("{n}.png"))).unwrap();
        let (rgb, w, h) = idavlm_shards::preprocess::decode_rgb8(&bytes, size).unwrap();
        let (px, grid) = patchify_rgb8(&rgb, w, h, min, max).unwrap();
        let r = refs(&dir.path().join(format!("{n}.safetensors")));
        let g = Vec::<i64>::try_from(r["image_grid_thw"].view([-1])).unwrap();
        assert_eq!([grid.t, grid.h, grid.w], g.as_slice(), "{size}: grid");
        let ours = Tensor::from_slice(&px).view([-1, 1536]);
        assert_eq!(ours.size(), r["pixel_values"].size(), "{size}");
        let d = (&ours - &r["pixel_values"]).abs().max().double_value(&[]);
        assert!(d <= 1e-6, "{size}: pixel values differ by {d}");
    }
    // 336x1040 is the half-to-even case: 20 x 64 patches, 320 LLM tokens.
    let r = refs(&dir.path().join("0.safetensors"));
    assert_eq!(Vec::<i64>::try_from(r["image_grid_thw"].view([-1])).unwrap(), [1, 20, 64]);
}

/// The template's token ids and labels equal an oracle built from the chat template's text, tiktoken
/// and transformers' smart_resize, on IDA-VLM's prompt forms (location, matching, QA, caption, a
/// multi-turn conversation, grounding answers rewritten to bbox_2d, non-ASCII text).
#[test]
fn template_ids_and_labels_equal_the_oracle() {
    use idavlm_shards::chat::{Overflow, Turn};
    use idavlm_shards::qwen3vl::template::{encode_conversation, rewrite_boxes, Pixels};
    let tok = idavlm_tests::tokenizer();
    let t = |from: &str, value: &str| Turn { from: from.into(), value: value.into() };
    let loc = rewrite_boxes("<ref>Ben Milo</ref><box>(102,33),(588,997)</box>").unwrap();
    let items: Vec<(Vec<Turn>, Vec<(usize, usize)>)> = vec![
        (
            vec![
                t("user", "Ben Milo is <img>r/ben.jpg</img>\n In the image: <img>s/1.jpg</img>\nIdentify Ben Milo with grounding."),
                t("assistant", &loc),
            ],
            vec![(180, 240), (1040, 336)],
        ),
        (
            vec![
                t("user", "Anna is <img>a.png</img>\n In the following four images, Which is Anna? Image 1: <img>1.png</img>\n Image 2: <img>2.png</img>\n Image 3: <img>3.png</img>\n Image 4: <img>4.png</img>"),
                t("assistant", "Image 3"),
            ],
            vec![(64, 64), (640, 480), (480, 640), (100, 100), (1920, 1080)],
        ),
        (
            vec![
                t("human", "Zoë is <img>z.jpg</img>\nLeo is <img>l.jpg</img>\n<img>scene.jpg</img>\nWhat is Zoë doing?"),
                t("gpt", "Zoë hands Leo a café crème; he smiles.\n\nThen they leave."),
                t("human", "And Leo?"),
                t("gpt", "He waves."),
            ],
            vec![(300, 500), (37, 1000), (2000, 3000)],
        ),
        (
            vec![t("system", "Describe people by name."), t("user", "<img>x.jpg</img>Give an image description."), t("assistant", "  Two people talk.")],
            vec![(97, 211)],
        ),
    ];
    let px = Pixels { min: 65_536, max: 1_048_576 };
    let dir = tempfile::tempdir().unwrap();
    let spec = serde_json::json!({
        "min_pixels": px.min, "max_pixels": px.max,
        "items": items.iter().map(|(turns, dims)| serde_json::json!({
            "conversations": turns.iter().map(|t| serde_json::json!({"from": t.from, "value": t.value})).collect::<Vec<_>>(),
            "image_sizes": dims.iter().map(|&(w, h)| [w, h]).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    std::fs::write(dir.path().join("in.json"), spec.to_string()).unwrap();
    let tiktoken = idavlm_shards::tokenizer::default_tokenizer_path().unwrap();
    python_script(
        "qwen3vl_template.py",
        [tiktoken, dir.path().join("in.json"), dir.path().join("out.json")],
    );
    let want: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(dir.path().join("out.json")).unwrap()).unwrap();
    for (n, ((turns, dims), w)) in items.iter().zip(&want).enumerate() {
        let e = encode_conversation(tok, &format!("s{n}"), turns, dims, px, 1 << 20, Overflow::Reject).unwrap();
        let ids: Vec<u32> = serde_json::from_value(w["input_ids"].clone()).unwrap();
        let labels: Vec<i64> = serde_json::from_value(w["labels"].clone()).unwrap();
        assert_eq!(e.input_ids, ids, "sample {n}: token ids");
        assert_eq!(e.labels, labels, "sample {n}: labels");
        assert_eq!(e.image_grids.len(), dims.len());
    }
    // An over-long sample is cut only outside image spans; a cut inside one refuses the sample.
    let (turns, dims) = &items[0];
    let e = encode_conversation(tok, "x", turns, dims, px, 1 << 20, Overflow::Reject).unwrap();
    let inside = e.image_starts[1] + 5;
    let err = encode_conversation(tok, "x", turns, dims, px, inside, Overflow::TruncateOutsideImages).unwrap_err();
    assert!(err.to_string().contains("inside an image span"), "{err}");
}
