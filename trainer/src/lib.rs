//! idavlm: trains IDA-VLM (Qwen-VL-Chat + ID-Former) with sharded AdamW over many ranks.
//!
//! Reading order: [`train::Trainer`] (building a run, one optimizer step), [`step::forward_backward`]
//! (one micro-batch, block by block), [`zero::Sharded`] (ZeRO-1/2/3 state and its prefetch/take API),
//! [`comm::Communicator`] (collectives), then [`model::QwenVl`] (the plain model), [`recipe::Recipe`]
//! and [`plan::Plan`] (what a recipe means on this device), [`checkpoint`].
//!
//! - [`model`]: config presets, parameter specs and counts, the tch modules, HF weight I/O.
//! - [`optim`]: AdamW and the schedules; [`flops`]: the MFU formula of PERF.md.
//! - [`runtime`]: process start-up (CUDA visibility, the NCCL library).
//! - re-exported from the data crate: [`tokenizer`], [`chat`], [`preprocess`].

pub mod bench;
pub mod checkpoint;
pub mod comm;
pub mod error;
pub mod eval;
pub mod flops;
pub mod infer;
pub mod memplan;
pub mod model;
pub mod optim;
pub mod plan;
pub mod profile;
pub mod recipe;
pub mod report;
pub mod runtime;
pub mod step;
pub mod tensorboard;
pub mod train;
pub mod zero;

pub use error::{Error, Result};
pub use idavlm_shards::{chat, preprocess, tokenizer};
