//! The LLM judge of MM-ID's QA and caption items (SPEC §5): any OpenAI-compatible Chat Completions
//! endpoint (the OpenAI API, Azure OpenAI, a local vLLM or llama.cpp server) scores each prediction
//! against the reference answer from 1 to 10.
//!
//! - The prompt: a system instruction that asks for the consistency of character names, states and
//!   actions between prediction and reference, with the score alone on the first line, and the user
//!   message `Question: .. Prediction: .. GT: ..` ([`request_for`]). Captions ask "Give an image
//!   description."; QA items ask the last line of the item's question.
//! - The verdict: the first integer of its first line, if it is 1..=10 ([`parse_verdict`]: "8",
//!   "Score: 8", "8/10", "10/10"). An unparsable verdict is asked again, then counted as unparsable,
//!   never scored.
//! - The transport: at most `concurrency` requests in flight, a timeout per request, retries with
//!   exponential back-off on 408/409/429/5xx, transport errors and malformed replies (a `Retry-After`
//!   header is honoured); 400/401/403/404 stop the run at once with what the server said.
//! - The cache: one JSON line per verdict, keyed by the SHA-256 of (judge model, system prompt, user
//!   message), appended and flushed as each verdict arrives, so re-scoring costs nothing and an
//!   interrupted run resumes. Lines are appended under an exclusive file lock (several ranks may share
//!   one file). The API key is read from the environment variable the configuration names and is never
//!   written anywhere: not to the cache, a report, a log or an error.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The system instruction of every request (the original evaluation's rules, in our words).
pub const SYSTEM_PROMPT: &str = "You grade answers about movie scenes whose characters are introduced by \
reference images. You are given a question, an AI assistant's prediction and the ground-truth answer, \
marked 'Question', 'Prediction' and 'GT'. Judge whether the prediction means the same as the GT, above \
all whether it gives the same characters the same names, the same states and the same actions; weigh its \
helpfulness, relevance and accuracy. Write one overall score, an integer from 1 (inconsistent) to 10 \
(fully consistent), alone on the first line; explain your judgement on the following lines, without \
letting the order in which the texts were given sway it.";

/// The question of a caption item (the original evaluation's).
pub const CAPTION_QUESTION: &str = "Give an image description.";

/// How to reach the judge: the CLI's `--judge-*` flags and the recipe's `eval.judge` block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeConfig {
    /// The endpoint's base URL (`https://api.openai.com/v1`, `http://127.0.0.1:8000/v1`, an Azure
    /// deployment's URL); `/chat/completions` is appended unless the URL already ends with it or
    /// carries a query (Azure's `?api-version=`).
    pub url: String,
    /// The judge model's name as the endpoint knows it.
    pub model: String,
    /// The environment variable that holds the API key (none: no key is sent, as a local server needs).
    #[serde(default)]
    pub key_env: Option<String>,
    /// How the key is sent: `bearer` (`Authorization: Bearer KEY`), `api-key` (Azure's header) or
    /// `auto` (`api-key` for `*.azure.com` hosts, else bearer).
    #[serde(default)]
    pub auth: AuthHeader,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Seconds one request may take, reply included.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Retries of one request after a transient failure (408, 409, 429, 5xx, a transport error, a
    /// malformed reply).
    #[serde(default = "default_retries")]
    pub retries: usize,
    /// The first back-off in seconds; each retry doubles it (capped at 60 s).
    #[serde(default = "default_backoff")]
    pub backoff_s: f64,
    /// How many times an unparsable verdict is asked again before it is counted as unparsable.
    #[serde(default = "default_unparsable_retries")]
    pub unparsable_retries: usize,
    /// The sampling temperature sent with each request (none: the endpoint's default, as reasoning
    /// models require).
    #[serde(default = "default_temperature")]
    pub temperature: Option<f64>,
    /// The verdict cache (default: beside the predictions file, `PREDS.judge-cache.jsonl`; during
    /// training, `judge-cache.jsonl` in the checkpoint folder).
    #[serde(default)]
    pub cache: Option<PathBuf>,
}

fn default_concurrency() -> usize {
    8
}
fn default_timeout() -> f64 {
    120.0
}
fn default_retries() -> usize {
    6
}
fn default_backoff() -> f64 {
    1.0
}
fn default_unparsable_retries() -> usize {
    2
}
fn default_temperature() -> Option<f64> {
    Some(0.0)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AuthHeader {
    #[default]
    Auto,
    Bearer,
    ApiKey,
}

impl JudgeConfig {
    pub fn new(url: &str, model: &str) -> Self {
        Self {
            url: url.into(),
            model: model.into(),
            key_env: None,
            auth: AuthHeader::Auto,
            concurrency: default_concurrency(),
            timeout_s: default_timeout(),
            retries: default_retries(),
            backoff_s: default_backoff(),
            unparsable_retries: default_unparsable_retries(),
            temperature: default_temperature(),
            cache: None,
        }
    }

    /// The values serde cannot check; `key` names where the block came from (a recipe key path or
    /// the CLI's flag prefix).
    pub fn check(&self, key: &str) -> Result<()> {
        let bad = |field: &str, why: &str| Err(Error::Invalid(format!("{key}{field}: {why}")));
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return bad("url", &format!("{:?} is not an http:// or https:// URL", self.url));
        }
        if self.model.trim().is_empty() {
            return bad("model", "empty");
        }
        if self.concurrency == 0 {
            return bad("concurrency", "must be at least 1");
        }
        if !(self.timeout_s > 0.0) {
            return bad("timeout_s", "must be > 0");
        }
        if !(self.backoff_s >= 0.0) {
            return bad("backoff_s", "must be >= 0");
        }
        if let Some(v) = &self.key_env {
            if v.is_empty() || v.contains('=') {
                return bad("key_env", &format!("{v:?} is not an environment variable's name"));
            }
        }
        Ok(())
    }

    /// The Chat Completions URL requests go to.
    pub fn endpoint(&self) -> String {
        let u = self.url.trim_end_matches('/');
        if u.ends_with("/chat/completions") || u.contains('?') {
            u.to_string()
        } else {
            format!("{u}/chat/completions")
        }
    }

    fn uses_api_key_header(&self) -> bool {
        match self.auth {
            AuthHeader::Bearer => false,
            AuthHeader::ApiKey => true,
            AuthHeader::Auto => {
                let host = self.url.split("://").nth(1).unwrap_or("").split(['/', ':', '?']).next().unwrap_or("");
                host.ends_with(".azure.com")
            }
        }
    }
}

/// The `--judge-*` flags of `idavlm-eval` and `idavlm-infer`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct JudgeArgs {
    /// The judge's OpenAI-compatible base URL (e.g. https://api.openai.com/v1 or a local vLLM's
    /// http://127.0.0.1:8000/v1); QA and caption items are left unjudged without it.
    #[arg(long)]
    pub judge_url: Option<String>,
    /// The judge model's name.
    #[arg(long)]
    pub judge_model: Option<String>,
    /// The environment variable holding the API key (never printed or stored); none: no key is sent.
    #[arg(long)]
    pub judge_key_env: Option<String>,
    /// How the key is sent (auto: Azure's api-key header for *.azure.com, else Authorization: Bearer).
    #[arg(long, value_enum, default_value_t = AuthHeader::Auto)]
    pub judge_auth: AuthHeader,
    /// The verdict cache (default: beside each predictions file, PREDS.judge-cache.jsonl).
    #[arg(long)]
    pub judge_cache: Option<PathBuf>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = default_concurrency())]
    pub judge_concurrency: usize,
    /// Seconds one request may take.
    #[arg(long, default_value_t = default_timeout())]
    pub judge_timeout_s: f64,
    /// Retries of a request after 429, 5xx, a timeout or a malformed reply.
    #[arg(long, default_value_t = default_retries())]
    pub judge_retries: usize,
    /// The first back-off in seconds (doubled at each retry, at most 60 s; a Retry-After wins when longer).
    #[arg(long, default_value_t = default_backoff())]
    pub judge_backoff_s: f64,
    /// Leave the sampling temperature to the endpoint (reasoning models refuse a temperature of 0).
    #[arg(long)]
    pub judge_default_temperature: bool,
}

impl JudgeArgs {
    /// The configuration the flags give, or None when no judge was named.
    pub fn config(&self) -> Result<Option<JudgeConfig>> {
        let (url, model) = match (&self.judge_url, &self.judge_model) {
            (None, None) => {
                if self.judge_key_env.is_some() || self.judge_cache.is_some() {
                    return Err(Error::Invalid("--judge-key-env and --judge-cache need --judge-url and --judge-model".into()));
                }
                return Ok(None);
            }
            (Some(u), Some(m)) => (u, m),
            (Some(_), None) => return Err(Error::Invalid("--judge-url needs --judge-model (the judge model's name)".into())),
            (None, Some(_)) => return Err(Error::Invalid("--judge-model needs --judge-url (the endpoint's base URL)".into())),
        };
        let mut c = JudgeConfig::new(url, model);
        c.key_env = self.judge_key_env.clone();
        c.auth = self.judge_auth;
        c.cache = self.judge_cache.clone();
        c.concurrency = self.judge_concurrency;
        c.timeout_s = self.judge_timeout_s;
        c.retries = self.judge_retries;
        c.backoff_s = self.judge_backoff_s;
        c.temperature = (!self.judge_default_temperature).then_some(0.0);
        c.check("--judge-")?;
        Ok(Some(c))
    }
}

/// Which column of the MM-ID table a benchmark type belongs to, and its image count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Matching,
    Location,
    Qa,
    Caption,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Images {
    Single,
    Multi,
    /// A type that does not say (`QA`, `caption`: the form the original script looked for).
    Unstated,
}

/// The task and image count of a benchmark type: the published file's `QA_singleimage`,
/// `QA_multiimage`, `caption_singleimage`, `caption_multiimage`, `matching`, `location`, and the bare
/// `QA` / `caption`. Case is ignored; None for a type of no column.
pub fn classify(kind: &str) -> Option<(Task, Images)> {
    let k = kind.to_ascii_lowercase();
    let (task, rest) = if let Some(r) = k.strip_prefix("qa") {
        (Task::Qa, r)
    } else if let Some(r) = k.strip_prefix("caption") {
        (Task::Caption, r)
    } else if k == "matching" {
        return Some((Task::Matching, Images::Unstated));
    } else if k == "location" {
        return Some((Task::Location, Images::Single));
    } else {
        return None;
    };
    match rest.trim_start_matches(['_', '-', ' ']) {
        "" => Some((task, Images::Unstated)),
        "singleimage" | "single_image" | "single" => Some((task, Images::Single)),
        "multiimage" | "multi_image" | "multi" => Some((task, Images::Multi)),
        _ => None,
    }
}

/// Whether the judge scores items of this type (QA and caption, whatever their image count).
pub fn judged(kind: &str) -> bool {
    matches!(classify(kind), Some((Task::Qa | Task::Caption, _)))
}

/// One question for the judge.
#[derive(Clone, Debug, PartialEq)]
pub struct JudgeRequest {
    pub system: String,
    pub user: String,
}

/// The judge's request for one QA or caption prediction (None for other types), in the original
/// evaluation's form `Question: Q Prediction: P GT: A`: captions ask "Give an image description.", QA
/// items the last line of their question (the lines before it introduce the characters and the scene;
/// a blank last line gives way to the last non-blank one).
pub fn request_for(kind: &str, question: &str, prediction: &str, answer: &str) -> Option<JudgeRequest> {
    let q = match classify(kind)? {
        (Task::Caption, _) => CAPTION_QUESTION.to_string(),
        (Task::Qa, _) => match question.split('\n').next_back() {
            Some(l) if !l.trim().is_empty() => l.to_string(),
            _ => question.lines().filter(|l| !l.trim().is_empty()).last().unwrap_or("").to_string(),
        },
        _ => return None,
    };
    Some(JudgeRequest { system: SYSTEM_PROMPT.to_string(), user: format!("Question: {q} Prediction: {prediction} GT: {answer}") })
}

/// The score of a verdict: the first integer on its first non-empty line, when it is 1..=10 ("8",
/// "Score: 8", "**8**", "8/10", "10/10"). A decimal ("7.5"), a number out of range or no number is
/// unparsable.
pub fn parse_verdict(text: &str) -> Option<u8> {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let b = line.as_bytes();
    let start = b.iter().position(u8::is_ascii_digit)?;
    let end = start + b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
    if b.get(end) == Some(&b'.') && b.get(end + 1).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    let n: u32 = line[start..end].parse().ok()?;
    (1..=10).contains(&n).then_some(n as u8)
}

/// What the judge said of one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// A score 1..=10 and the verdict's text.
    Scored { score: u8, text: String },
    /// Every answer was unparsable; the last one's text.
    Unparsable { text: String },
    /// No answer after every retry (the last error); not cached, so a later run asks again.
    Failed { error: String },
}

impl Verdict {
    pub fn score(&self) -> Option<u8> {
        match self {
            Verdict::Scored { score, .. } => Some(*score),
            _ => None,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct CacheLine {
    key: String,
    model: String,
    verdict: String,
    score: Option<u8>,
}

/// The verdict cache: a JSONL file read once, appended one flushed line per new verdict.
pub struct Cache {
    path: PathBuf,
    known: Mutex<HashMap<String, (String, Option<u8>)>>,
}

impl Cache {
    /// Opens (and reads) the cache at `path`; a missing file is an empty cache. A torn last line (an
    /// interrupted write) is ignored; any other unreadable line is an error naming it.
    pub fn open(path: &Path) -> Result<Self> {
        let mut known = HashMap::new();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let n = text.lines().count();
                for (i, line) in text.lines().enumerate() {
                    match serde_json::from_str::<CacheLine>(line) {
                        Ok(c) => {
                            known.insert(c.key, (c.verdict, c.score));
                        }
                        Err(_) if i + 1 == n && !text.ends_with('\n') => {}
                        Err(e) => {
                            return Err(Error::format(path, format!("line {}: not a judge cache line ({e}); remove the line or the file", i + 1)))
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(path, e)),
        }
        Ok(Self { path: path.to_path_buf(), known: Mutex::new(known) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.known.lock().expect("cache lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key of a request to `model`: SHA-256 over the model's name and both messages.
    pub fn key(model: &str, r: &JudgeRequest) -> String {
        let mut h = Sha256::new();
        for part in [model, &r.system, &r.user] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        hex::encode(h.finalize())
    }

    fn get(&self, key: &str) -> Option<(String, Option<u8>)> {
        self.known.lock().expect("cache lock").get(key).cloned()
    }

    fn put(&self, key: &str, model: &str, verdict: &str, score: Option<u8>) -> Result<()> {
        let mut line = serde_json::to_string(&CacheLine {
            key: key.into(),
            model: model.into(),
            verdict: verdict.into(),
            score,
        })
        .expect("a cache line serialises");
        line.push('\n');
        let mut known = self.known.lock().expect("cache lock");
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        // Other processes (ranks) may append to the same file: one whole line under the lock.
        f.lock().map_err(|e| Error::io(&self.path, e))?;
        let r = f.write_all(line.as_bytes()).and_then(|_| f.flush());
        let _ = f.unlock();
        r.map_err(|e| Error::io(&self.path, e))?;
        known.insert(key.into(), (verdict.into(), score));
        Ok(())
    }
}

/// Counts of one [`Judge::judge_all`] call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct JudgeStats {
    /// Answered from the cache.
    pub cached: usize,
    /// Requests sent (retries included).
    pub requests: usize,
    pub retries: usize,
}

/// A client of one judge endpoint.
pub struct Judge {
    cfg: JudgeConfig,
    endpoint: String,
    key: Option<String>,
    agent: ureq::Agent,
}

/// How one HTTP exchange ended.
enum Reply {
    Text(String),
    /// Worth asking again after the back-off (and the server's `Retry-After`, if it gave one).
    Transient(String, Option<f64>),
    /// Asking again cannot help: the whole run stops.
    Fatal(String),
}

impl Judge {
    /// A client for `cfg`; the key is read from its environment variable now (an unset variable is an
    /// error naming it).
    pub fn new(cfg: &JudgeConfig) -> Result<Self> {
        cfg.check("judge.")?;
        let key = match &cfg.key_env {
            Some(var) => match std::env::var(var) {
                Ok(k) if !k.trim().is_empty() => Some(k.trim().to_string()),
                _ => {
                    return Err(Error::Invalid(format!(
                        "the judge's key variable {var} is not set or empty (set it, or give no key variable for an endpoint without keys)"
                    )))
                }
            },
            None => None,
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs_f64(cfg.timeout_s)))
            .http_status_as_error(false)
            .user_agent(concat!("idavlm-eval/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Self { cfg: cfg.clone(), endpoint: cfg.endpoint(), key, agent })
    }

    pub fn config(&self) -> &JudgeConfig {
        &self.cfg
    }

    /// Judges every request (cached ones from `cache`, the rest over at most `concurrency` connections),
    /// calling `done` after each; the verdicts come back in the requests' order. A fatal reply (400,
    /// 401, 403, 404) or a judge that never answered any request is an error; a request that failed
    /// after its retries is a [`Verdict::Failed`].
    pub fn judge_all(
        &self,
        requests: &[JudgeRequest],
        cache: &Cache,
        done: &(dyn Fn() + Sync),
    ) -> Result<(Vec<Verdict>, JudgeStats)> {
        let out: Mutex<Vec<Option<Verdict>>> = Mutex::new(vec![None; requests.len()]);
        let stats = Mutex::new(JudgeStats::default());
        let mut todo = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            match cache.get(&Cache::key(&self.cfg.model, r)) {
                Some((text, Some(score))) => out.lock().expect("lock")[i] = Some(Verdict::Scored { score, text }),
                Some((text, None)) => out.lock().expect("lock")[i] = Some(Verdict::Unparsable { text }),
                None => {
                    todo.push(i);
                    continue;
                }
            }
            stats.lock().expect("lock").cached += 1;
            done();
        }
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let answered_any = AtomicBool::new(false);
        let fatal: Mutex<Option<String>> = Mutex::new(None);
        let workers = self.cfg.concurrency.min(todo.len());
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Some(&i) = todo.get(next.fetch_add(1, Ordering::SeqCst)) else { return };
                    let r = self.judge_one(&requests[i], cache, &stop, &answered_any, &stats);
                    match r {
                        Ok(v) => {
                            out.lock().expect("lock")[i] = Some(v);
                            done();
                        }
                        Err(e) => {
                            stop.store(true, Ordering::SeqCst);
                            fatal.lock().expect("lock").get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        if let Some(e) = fatal.into_inner().expect("lock") {
            return Err(Error::Invalid(e));
        }
        let verdicts = out.into_inner().expect("lock").into_iter().map(|v| v.expect("every request judged")).collect();
        Ok((verdicts, stats.into_inner().expect("lock")))
    }

    /// One request: retried while transient, asked again while unparsable. Err only for what stops
    /// the run.
    fn judge_one(
        &self,
        r: &JudgeRequest,
        cache: &Cache,
        stop: &AtomicBool,
        answered_any: &AtomicBool,
        stats: &Mutex<JudgeStats>,
    ) -> std::result::Result<Verdict, String> {
        let key = Cache::key(&self.cfg.model, r);
        let mut last_text = None;
        for _ask in 0..=self.cfg.unparsable_retries {
            let mut attempt = 0;
            let text = loop {
                if stop.load(Ordering::SeqCst) {
                    return Ok(Verdict::Failed { error: "stopped".into() });
                }
                stats.lock().expect("lock").requests += 1;
                match self.send(r) {
                    Reply::Text(t) => break t,
                    Reply::Fatal(e) => return Err(e),
                    Reply::Transient(e, retry_after) => {
                        if attempt >= self.cfg.retries {
                            if !answered_any.load(Ordering::SeqCst) {
                                return Err(format!(
                                    "the judge at {} gave no answer to any request ({} attempts at the first one); last error: {e}",
                                    self.endpoint,
                                    attempt + 1
                                ));
                            }
                            return Ok(Verdict::Failed { error: e });
                        }
                        stats.lock().expect("lock").retries += 1;
                        let backoff = (self.cfg.backoff_s * 2f64.powi(attempt as i32)).min(60.0);
                        std::thread::sleep(Duration::from_secs_f64(retry_after.unwrap_or(0.0).min(60.0).max(backoff)));
                        attempt += 1;
                    }
                }
            };
            answered_any.store(true, Ordering::SeqCst);
            if let Some(score) = parse_verdict(&text) {
                cache.put(&key, &self.cfg.model, &text, Some(score)).map_err(|e| e.to_string())?;
                return Ok(Verdict::Scored { score, text });
            }
            last_text = Some(text);
        }
        let text = last_text.unwrap_or_default();
        cache.put(&key, &self.cfg.model, &text, None).map_err(|e| e.to_string())?;
        Ok(Verdict::Unparsable { text })
    }

    fn send(&self, r: &JudgeRequest) -> Reply {
        let mut body = serde_json::json!({
            "model": self.cfg.model,
            "messages": [
                {"role": "system", "content": r.system},
                {"role": "user", "content": r.user},
            ],
        });
        if let Some(t) = self.cfg.temperature {
            body["temperature"] = serde_json::json!(t);
        }
        let mut req = self.agent.post(&self.endpoint).header("Content-Type", "application/json");
        if let Some(k) = &self.key {
            req = if self.cfg.uses_api_key_header() {
                req.header("api-key", k)
            } else {
                req.header("Authorization", &format!("Bearer {k}"))
            };
        }
        let mut resp = match req.send(body.to_string().as_bytes()) {
            Ok(r) => r,
            Err(e) => return Reply::Transient(format!("{}: {e}", self.endpoint), None),
        };
        let status = resp.status().as_u16();
        let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<f64>().ok());
        let text = match resp.body_mut().read_to_string() {
            Ok(t) => t,
            Err(e) => return Reply::Transient(format!("{}: reading the reply: {e}", self.endpoint), retry_after),
        };
        let said = || {
            let t: String = text.chars().take(300).collect();
            if t.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", t.trim())
            }
        };
        match status {
            200..=299 => match completion_text(&text) {
                Some(t) => Reply::Text(t),
                None => Reply::Transient(format!("{}: a reply that is not a chat completion{}", self.endpoint, said()), None),
            },
            401 | 403 => Reply::Fatal(format!(
                "the judge at {} refused the request ({status}){}; check the key in {}",
                self.endpoint,
                said(),
                self.cfg.key_env.as_deref().map(|v| format!("${v}")).unwrap_or_else(|| "--judge-key-env (none was given)".into())
            )),
            404 => Reply::Fatal(format!(
                "the judge at {} answered 404 (no such endpoint or model {:?}){}",
                self.endpoint,
                self.cfg.model,
                said()
            )),
            400 | 405 | 413 | 415 | 422 => {
                Reply::Fatal(format!("the judge at {} rejected the request ({status}){}", self.endpoint, said()))
            }
            _ => Reply::Transient(format!("{}: HTTP {status}{}", self.endpoint, said()), retry_after),
        }
    }
}

/// `choices[0].message.content` of a Chat Completions reply.
fn completion_text(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get("choices")?.get(0)?.get("message")?.get("content")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_forms() {
        for (t, s) in [
            ("8", Some(8)),
            ("Score: 8", Some(8)),
            ("8/10", Some(8)),
            ("10/10\nGood.", Some(10)),
            ("  \n**7** - close", Some(7)),
            ("1", Some(1)),
            ("Score: 0", None),
            ("11", None),
            ("7.5", None),
            ("no score\n8", None),
            ("", None),
        ] {
            assert_eq!(parse_verdict(t), s, "{t:?}");
        }
    }

    #[test]
    fn types_of_the_published_file() {
        assert_eq!(classify("QA_singleimage"), Some((Task::Qa, Images::Single)));
        assert_eq!(classify("QA_multiimage"), Some((Task::Qa, Images::Multi)));
        assert_eq!(classify("caption_singleimage"), Some((Task::Caption, Images::Single)));
        assert_eq!(classify("caption_multiimage"), Some((Task::Caption, Images::Multi)));
        assert_eq!(classify("QA"), Some((Task::Qa, Images::Unstated)));
        assert_eq!(classify("matching"), Some((Task::Matching, Images::Unstated)));
        assert_eq!(classify("location"), Some((Task::Location, Images::Single)));
        assert_eq!(classify("qabc"), None);
        let r = request_for("QA_multiimage", "Ann is <img>a</img>\n In the image: <img>b</img>\n What is Ann holding? ", " A cup. ", "a cup")
            .unwrap();
        assert_eq!(r.user, "Question:  What is Ann holding?  Prediction:  A cup.  GT: a cup");
        let r = request_for("caption_singleimage", "Ann is <img>a</img>\nDescribe.", "x", "y").unwrap();
        assert_eq!(r.user, "Question: Give an image description. Prediction: x GT: y");
        assert!(request_for("matching", "q", "p", "a").is_none());
    }

    #[test]
    fn endpoints_and_checks() {
        assert_eq!(JudgeConfig::new("http://h:8000/v1/", "m").endpoint(), "http://h:8000/v1/chat/completions");
        assert_eq!(JudgeConfig::new("http://h/v1/chat/completions", "m").endpoint(), "http://h/v1/chat/completions");
        let az = JudgeConfig::new("https://r.openai.azure.com/openai/deployments/d/chat/completions?api-version=2024-10-21", "d");
        assert!(az.endpoint().ends_with("?api-version=2024-10-21"));
        assert!(az.uses_api_key_header());
        assert!(!JudgeConfig::new("https://api.openai.com/v1", "m").uses_api_key_header());
        assert!(JudgeConfig::new("ftp://x", "m").check("judge.").unwrap_err().to_string().contains("judge.url"));
    }
}
