use idavlm_shards::chat::{encode_conversation, ImageRole, Overflow, Turn, IGNORE_INDEX};
use idavlm_shards::tokenizer::*;
use idavlm_tests::tokenizer;

#[test]
fn token_ids_of_the_spec() {
    let t = tokenizer();
    assert_eq!(t.encode("\n"), vec![198]);
    assert_eq!(t.encode(" is"), vec![374]);
    assert_eq!(t.encode("You are a helpful assistant."), vec![2610, 525, 264, 10950, 17847, 13]);
    assert_eq!(t.decode(&t.encode("Héllo wörld 123 <ref>x</ref>")), "Héllo wörld 123 <ref>x</ref>");
}

#[test]
fn special_tokens_inside_text() {
    let t = tokenizer();
    let ids = t.encode("a<|im_start|>b<ref>Bob</ref><box>(1,2),(3,4)</box><|endoftext|>");
    assert!(ids.contains(&IM_START));
    assert!(ids.contains(&REF_START) && ids.contains(&REF_END) && ids.contains(&BOX_START) && ids.contains(&BOX_END));
    assert_eq!(*ids.last().unwrap(), ENDOFTEXT);
    assert_eq!(t.special_id("<|extra_204|>"), Some(151_850));
    assert_eq!(t.special_id("<imgpad>"), Some(IMG_PAD));
    // Not special without the exact spelling.
    assert!(!t.encode("<|im_star|>").contains(&IM_START));
}

#[test]
fn chatml_labels_with_images() {
    let t = tokenizer();
    let turns = vec![
        Turn {
            from: "user".into(),
            value: "Bob is <img>r.png</img>\nIn the image: <img>s.jpg</img>\nIdentify Bob with grounding.".into(),
        },
        Turn { from: "assistant".into(), value: "<ref>Bob</ref><box>(1,2),(3,4)</box>".into() },
    ];
    let e = encode_conversation(t, "x", &turns, 2048, Overflow::Reject).unwrap();
    let nl = 198u32;
    // System: <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
    let mut want_ids = vec![IM_START];
    want_ids.extend(t.encode("system"));
    want_ids.push(nl);
    want_ids.extend([2610, 525, 264, 10950, 17847, 13]);
    want_ids.extend([IM_END, nl]);
    let sys_len = want_ids.len();
    // User turn.
    let user_start = want_ids.len();
    want_ids.push(IM_START);
    want_ids.extend(t.encode("user"));
    want_ids.push(nl);
    want_ids.extend(t.encode("Bob is "));
    let ref_at = want_ids.len();
    want_ids.push(IMG_START);
    want_ids.extend(std::iter::repeat_n(IMG_PAD, 256));
    want_ids.push(IMG_END);
    want_ids.extend(t.encode("\nIn the image: "));
    let test_at = want_ids.len();
    want_ids.push(IMG_START);
    want_ids.extend(std::iter::repeat_n(IMG_PAD, 256));
    want_ids.push(IMG_END);
    want_ids.extend(t.encode("\nIdentify Bob with grounding."));
    want_ids.extend([IM_END, nl]);
    let asst_start = want_ids.len();
    want_ids.push(IM_START);
    want_ids.extend(t.encode("assistant"));
    want_ids.push(nl);
    let content = t.encode("<ref>Bob</ref><box>(1,2),(3,4)</box>");
    want_ids.extend(&content);
    want_ids.extend([IM_END, nl]);
    assert_eq!(e.input_ids, want_ids);

    let mut want_labels = vec![IM_START as i64];
    want_labels.extend(std::iter::repeat_n(IGNORE_INDEX, sys_len - 3));
    want_labels.extend([IM_END as i64, nl as i64]);
    want_labels.push(IM_START as i64);
    want_labels.extend(std::iter::repeat_n(IGNORE_INDEX, asst_start - user_start - 3));
    want_labels.extend([IM_END as i64, nl as i64]);
    want_labels.push(IM_START as i64);
    want_labels.extend([IGNORE_INDEX, IGNORE_INDEX]); // "assistant", "\n"
    want_labels.extend(content.iter().map(|&c| c as i64));
    want_labels.extend([IM_END as i64, nl as i64]);
    assert_eq!(e.labels, want_labels);
    assert_eq!(e.image_starts, vec![ref_at, test_at]);
    assert_eq!(e.image_paths, vec!["r.png", "s.jpg"]);
    assert_eq!(e.image_roles, vec![ImageRole::Reference, ImageRole::Test]);
    assert_eq!(e.input_ids[ref_at - 2], IS_TOKEN);
}

#[test]
fn overlong_samples_are_never_cut_inside_an_image() {
    let t = tokenizer();
    let turns = vec![
        Turn { from: "user".into(), value: "<img>a.png</img> describe".into() },
        Turn { from: "assistant".into(), value: "word ".repeat(50) },
    ];
    let full = encode_conversation(t, "x", &turns, 4096, Overflow::Reject).unwrap();
    // A cut inside the image span is refused...
    let e = encode_conversation(t, "x", &turns, 100, Overflow::TruncateOutsideImages).unwrap_err();
    assert!(e.to_string().contains("inside an image span"), "{e}");
    // ...a cut after it truncates.
    let cut = full.input_ids.len() - 10;
    let e = encode_conversation(t, "x", &turns, cut, Overflow::TruncateOutsideImages).unwrap();
    assert!(e.truncated && e.input_ids.len() == cut && e.image_starts.len() == 1);
    assert!(encode_conversation(t, "x", &turns, cut, Overflow::Reject).is_err());
}

#[test]
fn a_missing_tokenizer_names_the_setup_step() {
    let out = std::process::Command::new(idavlm_tests::bin("idavlm-shards"))
        .args(["synth", "/nonexistent/never"])
        .env("IDAVLM_TOKENIZER", "/nonexistent/qwen.tiktoken")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("scripts/setup.sh") && err.contains("qwen.tiktoken"), "{err}");
}
