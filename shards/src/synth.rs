//! The synthetic ID-recognition dataset: deterministic in its seed, the embedded default of the demo
//! and the tests.
//!
//! A cast of named characters is drawn procedurally (shape x pattern x two colours, all distinct).
//! Reference crops show one character on a plain card; scenes place 2-4 characters on varied
//! backgrounds and record their boxes. Samples use the exact IDA-VLM prompt formats (SPEC §3): location
//! with grounding, 4-way matching, QA and captions naming the characters, and a `general` source with
//! no references. Held-out items use scenes drawn from a separate random stream and are written in the
//! MM-ID benchmark JSON layout (SPEC §5).

use std::io::Cursor;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::chat::Turn;
use crate::error::{Error, Result};
use crate::format::{DatasetWriter, ImageBlob, Sample};

pub const NAMES: [&str; 24] = [
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Kate", "Leo", "Mia", "Nora", "Oscar",
    "Paul", "Quinn", "Rose", "Sam", "Tina", "Victor", "Wendy", "Xavier", "Zoe",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Diamond,
    Cross,
    Ring,
}
const SHAPES: [Shape; 6] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Diamond, Shape::Cross, Shape::Ring];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    Solid,
    HStripes,
    VStripes,
    Dots,
    Checker,
}
const PATTERNS: [Pattern; 5] = [Pattern::Solid, Pattern::HStripes, Pattern::VStripes, Pattern::Dots, Pattern::Checker];

const PALETTE: [(&str, [u8; 3]); 8] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [240, 210, 40]),
    ("purple", [150, 60, 190]),
    ("orange", [245, 140, 30]),
    ("white", [245, 245, 245]),
    ("black", [20, 20, 20]),
];

#[derive(Clone, Debug)]
pub struct Character {
    pub name: &'static str,
    pub shape: Shape,
    pub pattern: Pattern,
    pub colour: usize,
    pub accent: usize,
}

/// The cast: the first `n` names, each with a distinct (shape, pattern, colour, accent).
pub fn cast(seed: u64, n: usize) -> Vec<Character> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xCA57);
    let mut combos = Vec::new();
    for s in SHAPES {
        for p in PATTERNS {
            for c in 0..PALETTE.len() {
                for a in 0..PALETTE.len() {
                    if a != c {
                        combos.push((s, p, c, a));
                    }
                }
            }
        }
    }
    combos.shuffle(&mut rng);
    // Prefer casts where shapes and colours vary: greedily take combos that differ in shape or colour.
    let mut out: Vec<Character> = Vec::new();
    for (s, p, c, a) in combos {
        if out.len() == n.min(NAMES.len()) {
            break;
        }
        if out.iter().any(|o| o.shape == s && o.colour == c) {
            continue;
        }
        out.push(Character { name: NAMES[out.len()], shape: s, pattern: p, colour: c, accent: a });
    }
    out
}

/// An RGB8 canvas.
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize, rgb: [u8; 3]) -> Self {
        Self { w, h, px: rgb.iter().copied().cycle().take(w * h * 3).collect() }
    }
    fn set(&mut self, x: usize, y: usize, c: [u8; 3]) {
        let i = (y * self.w + x) * 3;
        self.px[i..i + 3].copy_from_slice(&c);
    }
    fn encode(&self, png: bool) -> Vec<u8> {
        let img = image::RgbImage::from_raw(self.w as u32, self.h as u32, self.px.clone()).expect("canvas size");
        let mut buf = Cursor::new(Vec::new());
        let fmt = if png { image::ImageFormat::Png } else { image::ImageFormat::Jpeg };
        img.write_to(&mut buf, fmt).expect("in-memory image encoding cannot fail");
        buf.into_inner()
    }
    /// Background: a two-colour gradient with light noise and a few stripes.
    fn background(w: usize, h: usize, rng: &mut ChaCha8Rng) -> Self {
        let a: [f32; 3] = std::array::from_fn(|_| rng.random_range(60.0..200.0));
        let b: [f32; 3] = std::array::from_fn(|_| rng.random_range(60.0..200.0));
        let vertical = rng.random_bool(0.5);
        let mut c = Canvas::new(w, h, [0, 0, 0]);
        for y in 0..h {
            for x in 0..w {
                let t = if vertical { y as f32 / h as f32 } else { x as f32 / w as f32 };
                let n: f32 = rng.random_range(-8.0..8.0);
                let col = std::array::from_fn(|k| (a[k] * (1.0 - t) + b[k] * t + n).clamp(0.0, 255.0) as u8);
                c.set(x, y, col);
            }
        }
        for _ in 0..rng.random_range(0..4) {
            let y0 = rng.random_range(0..h);
            let col: [u8; 3] = std::array::from_fn(|_| rng.random_range(50..210));
            for y in y0..(y0 + 2).min(h) {
                for x in 0..w {
                    c.set(x, y, col);
                }
            }
        }
        c
    }
    /// Draws a character into the box [x0, x1) x [y0, y1).
    fn draw(&mut self, ch: &Character, x0: usize, y0: usize, x1: usize, y1: usize) {
        let (cw, chh) = ((x1 - x0) as f32, (y1 - y0) as f32);
        for y in y0..y1.min(self.h) {
            for x in x0..x1.min(self.w) {
                let u = ((x - x0) as f32 + 0.5) / cw * 2.0 - 1.0;
                let v = ((y - y0) as f32 + 0.5) / chh * 2.0 - 1.0;
                let inside = match ch.shape {
                    Shape::Circle => u * u + v * v <= 1.0,
                    Shape::Square => u.abs() <= 0.9 && v.abs() <= 0.9,
                    Shape::Triangle => v >= -0.95 && v <= 0.95 && u.abs() <= (v + 0.95) / 1.9,
                    Shape::Diamond => u.abs() + v.abs() <= 1.0,
                    Shape::Cross => (u.abs() <= 0.3 && v.abs() <= 0.95) || (v.abs() <= 0.3 && u.abs() <= 0.95),
                    Shape::Ring => {
                        let r = u * u + v * v;
                        (0.35..=1.0).contains(&r)
                    }
                };
                if !inside {
                    continue;
                }
                let (px, py) = (x - x0, y - y0);
                let cell = (cw.min(chh) / 6.0).max(2.0) as usize;
                let accent = match ch.pattern {
                    Pattern::Solid => false,
                    Pattern::HStripes => (py / cell) % 2 == 1,
                    Pattern::VStripes => (px / cell) % 2 == 1,
                    Pattern::Dots => {
                        let (cx, cy) = ((px % (2 * cell)) as f32 - cell as f32, (py % (2 * cell)) as f32 - cell as f32);
                        cx * cx + cy * cy < (cell as f32 * 0.6).powi(2)
                    }
                    Pattern::Checker => (px / cell + py / cell) % 2 == 1,
                };
                self.set(x, y, PALETTE[if accent { ch.accent } else { ch.colour }].1);
            }
        }
    }
}

/// A scene: a background with characters at pixel boxes (x1, y1, x2, y2), x2/y2 exclusive.
pub struct Scene {
    pub w: usize,
    pub h: usize,
    pub people: Vec<(usize, [usize; 4])>,
    pub jpeg: Vec<u8>,
}

pub const SCENE_W: usize = 192;
pub const SCENE_H: usize = 144;
pub const REF_SIZE: usize = 64;

/// A scene holding every character of `must_include` (a rare crowded draw that could not place one is
/// drawn again).
fn make_scene(cast: &[Character], rng: &mut ChaCha8Rng, must_include: &[usize]) -> Scene {
    loop {
        let scene = draw_scene(cast, rng, must_include);
        if must_include.iter().all(|m| scene.people.iter().any(|p| p.0 == *m)) {
            return scene;
        }
    }
}

fn draw_scene(cast: &[Character], rng: &mut ChaCha8Rng, must_include: &[usize]) -> Scene {
    let mut canvas = Canvas::background(SCENE_W, SCENE_H, rng);
    let n = rng.random_range(2..=4).max(must_include.len());
    let mut ids: Vec<usize> = must_include.to_vec();
    let mut others: Vec<usize> = (0..cast.len()).filter(|i| !ids.contains(i)).collect();
    others.shuffle(rng);
    ids.extend(others.into_iter().take(n - ids.len()));
    ids.shuffle(rng);
    let mut boxes: Vec<[usize; 4]> = Vec::new();
    let mut people = Vec::new();
    for id in ids {
        for _attempt in 0..200 {
            let s = rng.random_range(32..=56usize);
            let bw = s;
            let bh = (s as f32 * rng.random_range(0.9..1.3)) as usize;
            if bh >= SCENE_H {
                continue;
            }
            let x = rng.random_range(0..SCENE_W - bw);
            let y = rng.random_range(0..SCENE_H - bh);
            let b = [x, y, x + bw, y + bh];
            let overlaps = boxes.iter().any(|o| b[0] < o[2] + 2 && o[0] < b[2] + 2 && b[1] < o[3] + 2 && o[1] < b[3] + 2);
            if !overlaps {
                canvas.draw(&cast[id], b[0], b[1], b[2], b[3]);
                boxes.push(b);
                people.push((id, b));
                break;
            }
        }
    }
    Scene { w: SCENE_W, h: SCENE_H, people, jpeg: canvas.encode(false) }
}

/// A reference crop: the character on a plain light card, slightly varied in size and placement.
fn make_ref(ch: &Character, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let g = rng.random_range(200..250u8);
    let mut c = Canvas::new(REF_SIZE, REF_SIZE, [g, g, g]);
    let s = rng.random_range(40..56usize);
    let x = rng.random_range(2..REF_SIZE - s - 1);
    let y = rng.random_range(2..REF_SIZE - s - 1);
    c.draw(ch, x, y, x + s, y + s);
    c.encode(true)
}

/// A matching candidate: the character on a random background.
fn make_candidate(ch: &Character, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut c = Canvas::background(REF_SIZE, REF_SIZE, rng);
    let s = rng.random_range(36..54usize);
    let x = rng.random_range(2..REF_SIZE - s - 1);
    let y = rng.random_range(2..REF_SIZE - s - 1);
    c.draw(ch, x, y, x + s, y + s);
    c.encode(false)
}

/// Box in Qwen-VL's grounding coordinates: integers normalised to [0, 1000).
pub fn box_to_grounding(b: [usize; 4], w: usize, h: usize) -> [usize; 4] {
    let n = |v: usize, d: usize| ((v * 1000) / d).min(999);
    [n(b[0], w), n(b[1], h), n(b[2], w), n(b[3], h)]
}

fn region(b: [usize; 4], w: usize, h: usize) -> String {
    let cx = (b[0] + b[2]) as f32 / 2.0 / w as f32;
    let cy = (b[1] + b[3]) as f32 / 2.0 / h as f32;
    let v = if cy < 1.0 / 3.0 {
        "top"
    } else if cy < 2.0 / 3.0 {
        "middle"
    } else {
        "bottom"
    };
    let hz = if cx < 1.0 / 3.0 {
        "left"
    } else if cx < 2.0 / 3.0 {
        "centre"
    } else {
        "right"
    };
    format!("the {v} {hz}")
}

fn shape_name(s: Shape) -> &'static str {
    match s {
        Shape::Circle => "circle",
        Shape::Square => "square",
        Shape::Triangle => "triangle",
        Shape::Diamond => "diamond",
        Shape::Cross => "cross",
        Shape::Ring => "ring",
    }
}

/// The kinds of sample the generator writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Location,
    Matching,
    Qa,
    Caption,
    General,
}

/// One generated item, independent of the output layout: text with `{IMAGE_k}` placeholders, the
/// images (bytes, file extension), the answer and, for location, the pixel box and the target's name.
pub struct Item {
    pub kind: Kind,
    pub question: String,
    pub answer: String,
    pub images: Vec<(Vec<u8>, &'static str)>,
    pub pixel_box: Option<[usize; 4]>,
    pub target: Option<String>,
}

fn placeholder(k: usize) -> String {
    format!("{{IMAGE_{k}}}")
}

pub fn make_item(cast: &[Character], kind: Kind, rng: &mut ChaCha8Rng) -> Item {
    match kind {
        Kind::Location => {
            let t = rng.random_range(0..cast.len());
            let scene = make_scene(cast, rng, &[t]);
            let b = scene.people.iter().find(|p| p.0 == t).expect("target placed").1;
            let g = box_to_grounding(b, scene.w, scene.h);
            let name = cast[t].name;
            Item {
                kind,
                question: format!(
                    "{name} is {}\nIn the image: {}\nIdentify {name} with grounding.",
                    placeholder(0),
                    placeholder(1)
                ),
                answer: format!("<ref>{name}</ref><box>({},{}),({},{})</box>", g[0], g[1], g[2], g[3]),
                images: vec![(make_ref(&cast[t], rng), "png"), (scene.jpeg, "jpg")],
                pixel_box: Some(b),
                target: Some(name.to_string()),
            }
        }
        Kind::Matching => {
            let mut ids: Vec<usize> = (0..cast.len()).collect();
            ids.shuffle(rng);
            let t = ids[0];
            let mut cands = ids[..4].to_vec();
            cands.shuffle(rng);
            let k = cands.iter().position(|&c| c == t).expect("target among candidates") + 1;
            let name = cast[t].name;
            let mut images = vec![(make_ref(&cast[t], rng), "png")];
            images.extend(cands.iter().map(|&c| (make_candidate(&cast[c], rng), "jpg")));
            Item {
                kind,
                question: format!(
                    "{name} is {}\n In the following four images, Which is {name}? Image 1: {}\n Image 2: {}\n Image 3: {}\n Image 4: {}",
                    placeholder(0),
                    placeholder(1),
                    placeholder(2),
                    placeholder(3),
                    placeholder(4)
                ),
                answer: format!("Image {k}"),
                images,
                pixel_box: None,
                target: Some(name.to_string()),
            }
        }
        Kind::Qa => {
            let mut ids: Vec<usize> = (0..cast.len()).collect();
            ids.shuffle(rng);
            let (a, b) = (ids[0], ids[1]);
            let scene = make_scene(cast, rng, &[a, b]);
            let ba = scene.people.iter().find(|p| p.0 == a).expect("a placed").1;
            let bb = scene.people.iter().find(|p| p.0 == b).expect("b placed").1;
            let (na, nb) = (cast[a].name, cast[b].name);
            let side = if ba[0] + ba[2] < bb[0] + bb[2] { "left" } else { "right" };
            Item {
                kind,
                question: format!(
                    "{na} is {}\n{nb} is {}\nIn the image: {}\nIs {na} to the left or to the right of {nb}?",
                    placeholder(0),
                    placeholder(1),
                    placeholder(2)
                ),
                answer: format!("{na} is to the {side} of {nb}."),
                images: vec![(make_ref(&cast[a], rng), "png"), (make_ref(&cast[b], rng), "png"), (scene.jpeg, "jpg")],
                pixel_box: None,
                target: None,
            }
        }
        Kind::Caption => {
            let scene = make_scene(cast, rng, &[]);
            let mut q = String::new();
            let mut images = Vec::new();
            for (k, (id, _)) in scene.people.iter().enumerate() {
                q.push_str(&format!("{} is {}\n", cast[*id].name, placeholder(k)));
                images.push((make_ref(&cast[*id], rng), "png"));
            }
            q.push_str(&format!("In the image: {}\nDescribe the image, naming the characters.", placeholder(images.len())));
            let mut people = scene.people.clone();
            people.sort_by_key(|p| (p.1[0], p.1[1]));
            let parts: Vec<String> =
                people.iter().map(|(id, b)| format!("{} is at {}", cast[*id].name, region(*b, scene.w, scene.h))).collect();
            images.push((scene.jpeg, "jpg"));
            Item { kind, question: q, answer: format!("{}.", parts.join(", ")), images, pixel_box: None, target: None }
        }
        Kind::General => {
            let scene = make_scene(cast, rng, &[]);
            let mut shapes: Vec<String> = scene
                .people
                .iter()
                .map(|(id, _)| format!("a {} {}", PALETTE[cast[*id].colour].0, shape_name(cast[*id].shape)))
                .collect();
            shapes.sort();
            Item {
                kind,
                question: format!("{}\nHow many shapes are in the picture, and what are they?", placeholder(0)),
                answer: format!("There are {} shapes: {}.", shapes.len(), shapes.join(", ")),
                images: vec![(scene.jpeg, "jpg")],
                pixel_box: None,
                target: None,
            }
        }
    }
}

/// Text with `{IMAGE_k}` replaced by `<img>PATH</img>`.
pub fn fill(question: &str, paths: &[String]) -> String {
    let mut q = question.to_string();
    for (k, p) in paths.iter().enumerate() {
        q = q.replace(&placeholder(k), &format!("<img>{p}</img>"));
    }
    q
}

/// What `synth` writes.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub seed: u64,
    pub cast_size: usize,
    pub id_samples: usize,
    pub general_samples: usize,
    /// Held-out ID samples in the training format (`out/heldout`: the held-out loss of `eval.data`),
    /// from their own random stream: scenes training never sees.
    pub heldout_samples: usize,
    pub eval_per_type: usize,
    pub row_group_rows: usize,
    pub target_shard_bytes: u64,
    /// The kinds of the ID samples, in turn (`--kinds`); the default mixes location twice, matching, QA
    /// and captions.
    pub id_kinds: Vec<Kind>,
}

/// The default turn of ID sample kinds.
pub const ID_KINDS: [Kind; 5] = [Kind::Location, Kind::Location, Kind::Matching, Kind::Qa, Kind::Caption];

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "location" => Ok(Kind::Location),
            "matching" => Ok(Kind::Matching),
            "qa" => Ok(Kind::Qa),
            "caption" => Ok(Kind::Caption),
            other => Err(format!("unknown ID sample kind {other:?} (known: location, matching, qa, caption)")),
        }
    }
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            seed: 1234,
            cast_size: 12,
            id_samples: 1200,
            general_samples: 200,
            heldout_samples: 64,
            eval_per_type: 40,
            row_group_rows: 32,
            target_shard_bytes: 4 << 20,
            id_kinds: ID_KINDS.to_vec(),
        }
    }
}

/// Writes `out/id`, `out/general` and `out/heldout` (Parquet datasets, `num_tokens` from `count_tokens`) and `out/eval`
/// (MM-ID JSON `mmid.json` + `images/`, and the same split as Parquet in `shards/`).
pub fn write_synth(out: &Path, o: &SynthOptions, count_tokens: &dyn Fn(&[Turn]) -> Result<i32>) -> Result<()> {
    let cast = cast(o.seed, o.cast_size);
    if o.id_kinds.is_empty() {
        return Err(Error::Invalid("no ID sample kinds to write".into()));
    }
    for (source, n, stream) in [("id", o.id_samples, 1u64), ("general", o.general_samples, 2), ("heldout", o.heldout_samples, 3)]
    {
        if source == "heldout" && n == 0 {
            continue;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(o.seed.wrapping_mul(1_000_003).wrapping_add(stream));
        let mut w = DatasetWriter::create(&out.join(source), &format!("synth-{source}"), o.target_shard_bytes, o.row_group_rows)?;
        for i in 0..n {
            let kind = if source == "general" { Kind::General } else { o.id_kinds[i % o.id_kinds.len()] };
            let item = make_item(&cast, kind, &mut rng);
            let id = format!("synth-{source}-{i:06}");
            let paths: Vec<String> = item.images.iter().enumerate().map(|(k, (_, ext))| format!("{id}/img{k}.{ext}")).collect();
            let conversations = vec![
                Turn { from: "user".into(), value: fill(&item.question, &paths) },
                Turn { from: "assistant".into(), value: item.answer },
            ];
            let num_tokens = count_tokens(&conversations)?;
            let images =
                item.images.into_iter().zip(&paths).map(|((bytes, _), p)| ImageBlob { bytes, path: p.clone() }).collect();
            w.push(Sample { id, source: source.to_string(), conversations, images, num_tokens })?;
        }
        w.finish()?;
    }
    write_eval(&out.join("eval"), &cast, o, count_tokens)
}

/// The held-out split in the MM-ID layout (scenes from their own random stream), as `mmid.json` +
/// `images/` and as the Parquet dataset `shards/`.
fn write_eval(dir: &Path, cast: &[Character], o: &SynthOptions, count_tokens: &dyn Fn(&[Turn]) -> Result<i32>) -> Result<()> {
    let img_dir = dir.join("images");
    std::fs::create_dir_all(&img_dir).map_err(|e| Error::io(&img_dir, e))?;
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed.wrapping_mul(7_919).wrapping_add(99));
    let mut items = Vec::new();
    for (kind, tname) in [
        (Kind::Matching, "matching"),
        (Kind::Location, "location"),
        (Kind::Qa, "QA_singleimage"),
        (Kind::Caption, "caption_singleimage"),
    ] {
        for i in 0..o.eval_per_type {
            let item = make_item(cast, kind, &mut rng);
            let id = format!("{tname}-{i:04}");
            // MM-ID numbers images from 0 for matching (image_0 is the reference), from 1 otherwise.
            let first = if kind == Kind::Matching { 0 } else { 1 };
            let mut obj = serde_json::Map::new();
            let mut q = item.question.clone();
            for (k, (bytes, ext)) in item.images.iter().enumerate() {
                let file = format!("{id}_{k}.{ext}");
                let p = img_dir.join(&file);
                std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
                let key = format!("image_{}", k + first);
                // The published benchmark's form: tagged placeholders, paths relative to the JSON's
                // folder with a leading "./".
                q = q.replace(&placeholder(k), &format!("<img>{key}</img>"));
                obj.insert(key, json!(format!("./images/{file}")));
            }
            obj.insert("id".into(), json!(id));
            obj.insert("type".into(), json!(tname));
            obj.insert("question".into(), json!(q));
            let answer = match (kind, item.pixel_box) {
                (Kind::Location, Some(b)) => format!("[{}, {}, {}, {}]", b[0], b[1], b[2], b[3]),
                _ => item.answer.clone(),
            };
            obj.insert("answer".into(), json!(answer));
            if let Some(t) = item.target.filter(|_| kind == Kind::Location) {
                obj.insert("ground_target".into(), json!(t));
            }
            items.push(serde_json::Value::Object(obj));
        }
    }
    let p = dir.join("mmid.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&items).expect("json")).map_err(|e| Error::io(&p, e))?;
    // The same split as a Parquet eval dataset (images embedded).
    let items = crate::mmid::read_json(&p)?;
    crate::mmid::write_parquet(&items, dir, &dir.join("shards"), "synth-eval", count_tokens)?;
    Ok(())
}

/// A natural-looking test photo of `w` x `h` (background gradient, noise, characters) as JPEG
/// (quality 75): the data-path benchmark's input.
pub fn photo_jpeg(w: usize, h: usize, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let cast = cast(seed, 8);
    let mut c = Canvas::background(w, h, &mut rng);
    for ch in cast.iter().take(4) {
        let s = rng.random_range(h / 6..h / 2);
        let x = rng.random_range(0..w - s);
        let y = rng.random_range(0..h - s);
        c.draw(ch, x, y, x + s, y + s);
    }
    c.encode(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by a 40,000-sample run: a crowded draw could leave a required character out and the QA item
    /// then panicked. Scenes asked for four given characters always hold all four, inside the image and
    /// apart from each other.
    #[test]
    fn a_scene_always_holds_the_characters_it_must_include() {
        let cast = cast(1234, 12);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..3000 {
            let must = [0, 3, 5, 11];
            let s = make_scene(&cast, &mut rng, &must);
            for m in must {
                let b = s.people.iter().find(|p| p.0 == m).expect("placed").1;
                assert!(b[2] <= s.w && b[3] <= s.h);
            }
        }
    }
}
