//! Aggregate decode speed of N sequences decoded together, one forward pass per step.
//!
//! `cargo run --release -p pod-inference --example batch_bench -- MODEL.gguf [N] [STEPS]`

use std::path::PathBuf;
use std::time::Instant;

use pod_inference::sampling::argmax;
use pod_inference::{ChatModel, Device, Sequence};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(args.next().ok_or("model path")?);
    let n: usize = args.next().map_or(Ok(8), |s| s.parse())?;
    let steps: usize = args.next().map_or(Ok(64), |s| s.parse())?;
    let model = ChatModel::load(&path, &Device::Cpu)?;
    let mut seqs: Vec<Sequence> = (0..n).map(|_| model.new_sequence()).collect();
    let mut next: Vec<u32> = (0..n as u32).map(|i| 100 + 37 * i).collect();
    // A short prompt each, so attention has something to read.
    for (s, t) in seqs.iter_mut().zip(&next) {
        let prompt: Vec<u32> = (0..32).map(|j| (t + j * 13) % 4000 + 1).collect();
        s.forward(&prompt)?;
    }
    let t = Instant::now();
    for _ in 0..steps {
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        let inputs: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let toks: Vec<&[u32]> = inputs.iter().map(|a| &a[..]).collect();
        let logits = model.forward_batch(&mut refs, &toks)?;
        next = logits.iter().map(|l| argmax(l)).collect();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "batch {n}: {:.1} tokens/s aggregate, {:.1} ms per step",
        (n * steps) as f64 / secs,
        secs * 1000.0 / steps as f64
    );
    Ok(())
}
