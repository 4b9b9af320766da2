//! The Qwen3-VL chat template's data side (SPEC-QWEN3VL.md §3.3, §4, §5, §14): its special tokens,
//! the image layout (smart_resize, merge-block patches), and the three rows of M-RoPE positions.
//! The model side lives in the trainer's `model::qwen3vl` folder.

pub mod image;
pub mod positions;
pub mod template;

/// The name a dataset records for this template (index.json `template`).
pub const TEMPLATE: &str = "qwen3-vl";

pub const ENDOFTEXT: u32 = 151_643;
pub const IM_START: u32 = 151_644;
pub const IM_END: u32 = 151_645;
pub const VISION_START: u32 = 151_652;
pub const VISION_END: u32 = 151_653;
pub const IMAGE_PAD: u32 = 151_655;
pub const VIDEO_PAD: u32 = 151_656;

/// Qwen3-VL's special tokens from 151643 in order (SPEC-QWEN3VL.md §14.1).
pub const SPECIALS: [&str; 26] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
];

/// The special tokens with their ids.
pub fn special_tokens() -> Vec<(String, u32)> {
    SPECIALS.iter().enumerate().map(|(i, s)| (s.to_string(), ENDOFTEXT + i as u32)).collect()
}
