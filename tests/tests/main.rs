//! One integration-test binary: cross-crate and multi-process tests of idavlm.
mod build;
mod dist;
mod docs;
mod integrity;
mod judge;
mod layering;
mod lora;
mod mmid;
mod model;
mod packing;
mod qwen3vl;
mod shards;
mod slurm;
mod tokenizer;
mod train;
