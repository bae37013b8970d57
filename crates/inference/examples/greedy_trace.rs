//! Greedy decoding of one chat prompt with the top-3 log-probabilities at each step, to compare
//! pod's numerics with llama.cpp's (`llama-server` with `"logprobs": true`).
//!
//! `cargo run --release -p pod-inference --example greedy_trace -- MODEL.gguf "prompt" [N]`

use std::path::PathBuf;

use pod_inference::sampling::{argmax, log_softmax, top_logprobs};
use pod_inference::{ChatMessage, ChatModel, Device, Role};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(args.next().ok_or("model path")?);
    let prompt = args.next().ok_or("prompt")?;
    let steps: usize = args.next().map_or(Ok(24), |s| s.parse())?;
    let model = ChatModel::load(&path, &Device::Cpu)?;
    let rendered = model
        .template()
        .render(&[ChatMessage::new(Role::User, &prompt)], true)?;
    let tokens = model.tokenizer().encode(&rendered)?;
    let mut seq = model.new_sequence();
    let mut logits = seq.forward(&tokens)?;
    for _ in 0..steps {
        let lp = log_softmax(&logits);
        let top: Vec<String> = top_logprobs(&lp, 3)
            .into_iter()
            .map(|(id, l)| format!("{:?} {l:.3}", model.tokenizer().token_piece(id)))
            .collect();
        println!("{}", top.join("  |  "));
        let next = argmax(&logits);
        if model.tokenizer().is_stop_token(next) {
            break;
        }
        logits = seq.forward(&[next])?;
    }
    Ok(())
}
