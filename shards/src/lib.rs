//! The data path of idavlm, free of libtorch.
//!
//! - [`tokenizer::Tokenizer`]: Qwen's BPE with special tokens; [`chat::encode_conversation`]: ChatML + labels.
//! - [`preprocess::preprocess_image`]: image bytes to normalised pixels (PIL-exact bicubic).
//! - [`format`]: the Parquet shard schema and the dataset manifest; [`convert`]: JSON + images to shards.
//! - [`mmid`]: benchmarks in the MM-ID layout, as JSON or as a Parquet eval dataset.
//! - [`synth`]: the deterministic synthetic ID-recognition dataset.
//! - [`reader::Reader`]: the streaming reader: global seeded order, rank shares, mixtures, exact resume.

pub mod chat;
pub mod error;
pub mod preprocess;
pub mod tokenizer;

pub use error::{Error, Result};
pub mod build;
pub mod convert;
pub mod format;
pub mod mmid;
pub mod order;
pub mod pack;
pub mod qwen3vl;
pub mod reader;
pub mod synth;
