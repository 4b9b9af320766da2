//! The MM-ID judge and report (`idavlm-eval`, `idavlm-infer --judge-*`, `eval.judge`) against a
//! stand-in Chat Completions server on 127.0.0.1 that answers with recorded verdict texts, 429s, 500s,
//! slow replies and malformed JSON. Nothing leaves the machine.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use idavlm_tests::judge_server::{JudgeServer, Reply};
use idavlm_tests::{bin, metrics, recipe, synth, tiny_checkpoint, worker_train};

const SECRET: &str = "sk-test-SECRET-4711";

/// One prediction line as idavlm-infer writes it.
fn line(id: &str, kind: &str, question: &str, prediction: &str, score: Option<f64>) -> String {
    serde_json::json!({"id": id, "type": kind, "question": question, "answer": format!("gt of {id}"),
        "prediction": prediction, "score": score, "unparsable": false})
    .to_string()
}

/// The prediction of a request (what the server keys its behaviour on).
fn prediction_of(body: &serde_json::Value) -> String {
    let user = body["messages"][1]["content"].as_str().unwrap_or_default();
    let after = user.split_once(" Prediction: ").map(|(_, r)| r).unwrap_or_default();
    after.split_once(" GT: ").map(|(p, _)| p).unwrap_or_default().to_string()
}

/// Predictions of every type of the published file, each QA/caption prediction telling the server
/// how to answer it.
fn predictions(dir: &Path) -> std::path::PathBuf {
    let q = "Ann is <img>./images/a.jpg</img>\n In the image: <img>./images/b.jpg</img>\n What is Ann doing?";
    let lines = [
        line("m1", "matching", "q", "Image 1", Some(1.0)),
        line("m2", "matching", "q", "Image 3", Some(0.0)),
        line("l1", "location", "q", "<box>(1,1),(9,9)</box>", Some(0.8)),
        line("q1", "QA_singleimage", q, "say 8", None),
        line("q2", "QA_singleimage", q, "say Score: 6", None),
        line("q3", "QA_multiimage", q, "say 10/10", None),
        line("q4", "QA_multiimage", q, "flaky 429", None),
        line("c1", "caption_singleimage", "Describe.", "say 8/10", None),
        line("c2", "caption_singleimage", "Describe.", "flaky 500", None),
        line("c3", "caption_multiimage", "Describe.", "slow", None),
        line("c4", "caption_multiimage", "Describe.", "malformed", None),
        line("c5", "caption_multiimage", "Describe.", "unparsable", None),
    ];
    let p = dir.join("preds.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

/// The scripted judge: recorded verdict forms, and one transient failure of each kind on a prompt's
/// first request. Every reply takes 150 ms, so the concurrency limit is reached.
fn scripted_server() -> JudgeServer {
    let asked: Mutex<HashMap<String, usize>> = Mutex::new(HashMap::new());
    JudgeServer::start(move |_, body| {
        let p = prediction_of(body);
        let n = {
            let mut a = asked.lock().unwrap();
            let n = a.entry(p.clone()).or_default();
            *n += 1;
            *n
        };
        let pace = Duration::from_millis(150);
        let r = match (p.as_str(), n) {
            (s, _) if s.starts_with("say ") => Reply::verdict(&format!("{}\nThe names and actions agree.", &s[4..])),
            ("flaky 429", 1) => Reply::status(429, r#"{"error": "rate limited"}"#).with_header("Retry-After", "0"),
            ("flaky 429", _) => Reply::verdict("4"),
            ("flaky 500", 1) => Reply::status(500, "upstream error"),
            ("flaky 500", _) => Reply::verdict("**5** close, one action differs"),
            ("slow", 1) => Reply::verdict("1").with_delay(Duration::from_secs(3)),
            ("slow", _) => Reply::verdict("7"),
            ("malformed", 1) => Reply::status(200, r#"{"choices": [{"message": "#),
            ("malformed", _) => Reply::verdict("9"),
            ("unparsable", _) => Reply::verdict("A fine description overall."),
            _ => Reply::status(400, "unexpected"),
        };
        let delay = r.delay.max(pace);
        r.with_delay(delay)
    })
}

fn eval_cmd(server: &JudgeServer, preds: &Path, report: &Path) -> Command {
    let mut c = Command::new(bin("idavlm-eval"));
    c.arg("--predictions")
        .arg(format!("run={}", preds.display()))
        .arg("--report")
        .arg(report)
        .args(["--published", "--judge-model", "fake-judge", "--judge-key-env", "FAKE_JUDGE_KEY"])
        .args(["--judge-concurrency", "3", "--judge-timeout-s", "1", "--judge-backoff-s", "0.05"])
        .arg("--judge-url")
        .arg(server.url())
        .env("FAKE_JUDGE_KEY", SECRET);
    c
}

fn run_ok(mut c: Command) -> (String, String) {
    let o = c.output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "failed ({:?}):\n{out}\n{err}", o.status.code());
    (out, err)
}

/// Every file under `dir`, as text.
fn all_text(dir: &Path) -> String {
    let mut s = String::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            s += &all_text(&p);
        } else if let Ok(t) = std::fs::read_to_string(&p) {
            s += &t;
        }
    }
    s
}

#[test]
fn the_judge_retries_parses_every_verdict_form_caches_and_resumes() {
    let d = tempfile::tempdir().unwrap();
    let preds = predictions(d.path());
    let server = scripted_server();
    let report = d.path().join("report");
    let (out, err) = run_ok(eval_cmd(&server, &preds, &report));

    // 4 answered at once, 4 transient failures retried once each, the unparsable one asked 3 times.
    let seen = server.seen();
    assert_eq!(seen.len(), 4 + 4 * 2 + 3, "{err}");
    assert_eq!(server.max_in_flight(), 3, "at most --judge-concurrency requests in flight, and that many");
    for s in &seen {
        assert_eq!(s.path, "/v1/chat/completions");
        assert!(s.headers.contains(&("authorization".into(), format!("Bearer {SECRET}"))));
        assert_eq!(s.body["model"], "fake-judge");
        assert_eq!(s.body["temperature"], 0.0);
        let sys = s.body["messages"][0]["content"].as_str().unwrap();
        assert!(sys.contains("names") && sys.contains("states") && sys.contains("actions") && sys.contains("first line"), "{sys}");
    }
    let users: BTreeSet<String> = seen.iter().map(|s| s.body["messages"][1]["content"].as_str().unwrap().to_string()).collect();
    // The original evaluation's message: the item question's last line, or the caption question.
    assert!(users.contains("Question:  What is Ann doing? Prediction: say 8 GT: gt of q1"), "{users:?}");
    assert!(users.contains("Question: Give an image description. Prediction: say 8/10 GT: gt of c1"), "{users:?}");

    let rep: serde_json::Value = serde_json::from_slice(&std::fs::read(report.join("report.json")).unwrap()).unwrap();
    let run = &rep["runs"][0];
    assert_eq!(run["name"], "run");
    assert_eq!(run["judge"]["model"], "fake-judge");
    assert_eq!(run["matching"]["accuracy"], 0.5);
    assert_eq!(run["location"]["accuracy"], 1.0);
    // QA: single (8 + 6) / 2, multi (10 + 4) / 2; caption: single (8 + 5) / 2, multi (7 + 9) / 2 with the
    // unparsable verdict left out of the mean and counted.
    assert_eq!(run["qa"]["single"]["mean"], 7.0);
    assert_eq!(run["qa"]["multi"]["mean"], 7.0);
    assert_eq!(run["qa"]["all"]["mean"], 7.0);
    assert_eq!(run["qa"]["all"]["items"], 4);
    assert_eq!(run["caption"]["single"]["mean"], 6.5);
    assert_eq!(run["caption"]["multi"]["mean"], 8.0);
    assert_eq!(run["caption"]["multi"]["unparsable"], 1);
    assert_eq!(run["caption"]["all"]["mean"], 7.25);
    assert_eq!(run["caption"]["all"]["judged"], 4);
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("| Model | Matching | Location | QA | Caption |"), "{md}");
    assert!(md.contains("| IDA-VLM (published) | 0.806 | 0.854 | 5.74 | 5.32 |"), "{md}");
    assert!(md.contains("| run | 0.500 | 1.000 | 7.00 | 7.25 |"), "{md}");
    assert!(out.contains("| run | 0.500 | 1.000 | 7.00 | 7.25 |"), "{out}");
    assert!(std::fs::read_to_string(report.join("scores.svg")).unwrap().starts_with("<svg"));
    let cache = d.path().join("preds.judge-cache.jsonl");
    assert_eq!(std::fs::read_to_string(&cache).unwrap().lines().count(), 9, "one line per judged item");

    // Again: every verdict from the cache, the same report, no request.
    let first = std::fs::read_to_string(report.join("report.json")).unwrap();
    run_ok(eval_cmd(&server, &preds, &report));
    assert_eq!(server.seen().len(), seen.len(), "a re-score asks nothing");
    assert_eq!(std::fs::read_to_string(report.join("report.json")).unwrap(), first);

    // An interrupted run (4 verdicts cached, a torn line after them): only the other prompts are asked.
    let text = std::fs::read_to_string(&cache).unwrap();
    let kept: Vec<&str> = text.lines().take(4).collect();
    std::fs::write(&cache, kept.join("\n") + "\n{\"key\": \"ab").unwrap();
    let before = server.seen().len();
    run_ok(eval_cmd(&server, &preds, &report));
    let asked: BTreeSet<String> = server.seen()[before..].iter().map(|s| prediction_of(&s.body)).collect();
    assert_eq!(asked.len(), 5, "{asked:?}");
    assert_eq!(std::fs::read_to_string(report.join("report.json")).unwrap(), first);

    // The key is never written: not to the report, the cache, stdout or stderr.
    assert!(!all_text(d.path()).contains(SECRET));
    assert!(!out.contains(SECRET) && !err.contains(SECRET));
}

#[test]
fn the_judge_stops_clearly_on_401_404_an_unset_key_and_no_answer() {
    let d = tempfile::tempdir().unwrap();
    let preds = predictions(d.path());
    let fails = |server: &JudgeServer, env: Option<&str>| {
        let mut c = eval_cmd(server, &preds, &d.path().join("r"));
        c.args(["--judge-retries", "1"]);
        if env.is_none() {
            c.env_remove("FAKE_JUDGE_KEY");
        }
        let o = c.output().unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!err.contains(SECRET), "{err}");
        err
    };
    let s401 = JudgeServer::start(|_, _| Reply::status(401, r#"{"error": {"message": "Incorrect API key"}}"#));
    let err = fails(&s401, Some("set"));
    assert!(err.contains("401") && err.contains("$FAKE_JUDGE_KEY") && err.contains("Incorrect API key"), "{err}");
    assert!(s401.seen().len() <= 3, "a fatal reply stops the other requests");
    let s404 = JudgeServer::start(|_, _| Reply::status(404, "no such model"));
    let err = fails(&s404, Some("set"));
    assert!(err.contains("404") && err.contains("fake-judge"), "{err}");
    let quiet = JudgeServer::start(|_, _| Reply::verdict("5"));
    let err = fails(&quiet, None);
    assert!(err.contains("FAKE_JUDGE_KEY is not set"), "{err}");
    assert!(quiet.seen().is_empty(), "nothing is sent without the key");
    let down = JudgeServer::start(|_, _| Reply::status(503, "overloaded"));
    let err = fails(&down, Some("set"));
    assert!(err.contains("gave no answer to any request") && err.contains("503"), "{err}");
    assert!(!d.path().join("r/report.json").exists(), "no report from a failed run");
}

#[test]
fn infer_with_a_judge_turns_a_checkpoint_and_the_benchmark_into_the_four_columns() {
    let d = tempfile::tempdir().unwrap();
    synth(&d.path().join("data"), 8, 2, 4);
    let ckpt = d.path().join("model");
    tiny_checkpoint(&ckpt);
    let server = JudgeServer::start(|_, _| Reply::verdict("6"));
    let out = d.path().join("preds.jsonl");
    let o = Command::new(bin("idavlm-infer"))
        .arg("--checkpoint")
        .arg(&ckpt)
        .arg("--bench")
        .arg(d.path().join("data/eval/mmid.json"))
        .arg("--out")
        .arg(&out)
        .args(["--max-new-tokens", "4", "--dtype", "f32", "--judge-model", "fake-judge", "--judge-url"])
        .arg(server.url())
        .env("IDAVLM_TORCH_THREADS", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    // synth's benchmark: 4 items of each of matching, location, QA_singleimage, caption_singleimage.
    assert_eq!(server.seen().len(), 8);
    assert!(server.seen().iter().all(|s| !s.headers.iter().any(|(k, _)| k == "authorization")), "no key variable, no key");
    let rep: serde_json::Value = serde_json::from_slice(&std::fs::read(d.path().join("preds.report/report.json")).unwrap()).unwrap();
    let run = &rep["runs"][0];
    assert_eq!(run["matching"]["items"], 4);
    assert_eq!(run["location"]["items"], 4);
    assert_eq!((run["qa"]["single"]["items"].as_u64(), run["qa"]["all"]["mean"].as_f64()), (Some(4), Some(6.0)));
    assert_eq!((run["caption"]["single"]["items"].as_u64(), run["caption"]["all"]["mean"].as_f64()), (Some(4), Some(6.0)));
    assert!(stdout.contains("| Model | Matching | Location | QA | Caption |"), "{stdout}");
    assert!(d.path().join("preds.judge-cache.jsonl").is_file());
}

#[test]
fn eval_during_training_judges_every_nth_evaluation_and_the_last() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    synth(&data, 16, 4, 4);
    let server = JudgeServer::start(|_, _| Reply::verdict("7"));
    let extra = format!(
        "eval:\n  every_steps: 1\n  mmid: {}\n  mmid_limit: 2\n  max_new_tokens: 4\n  judge_every: 3\n  judge_limit: 3\n  \
         judge_max_new_tokens: 4\n  judge:\n    url: {}\n    model: fake-judge\n    backoff_s: 0.01\n",
        data.join("eval/mmid.json").display(),
        server.url()
    );
    let r = recipe(d.path(), &data, &extra);
    let o = worker_train(&r, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = metrics(&d.path().join("metrics.jsonl"));
    let judged: Vec<u64> = m.iter().filter(|v| v.get("eval/qa").is_some()).map(|v| v["step"].as_u64().unwrap()).collect();
    // Evaluations after steps 1..4: the 3rd (step 3) and the last (step 4) are judged.
    assert_eq!(judged, vec![3, 4]);
    assert!(m.iter().all(|v| v.get("eval/matching").is_some()));
    let last = m.last().unwrap();
    assert_eq!(last["eval/qa"], 7.0);
    assert_eq!(last.get("eval/caption"), None, "judge_limit 3 takes the first three judged items: all QA");
    // The verdicts are cached in checkpoint.dir (3 per judged evaluation, fewer where answers repeat).
    let cache = std::fs::read_to_string(d.path().join("ckpt/judge-cache.jsonl")).unwrap();
    assert!(cache.lines().count() >= 3);
    assert!(server.seen().len() <= 6);
}
