//! Turning logits into the next token: penalties, temperature, top-k, top-p, min-p, seeded RNG.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How the next token is chosen. Defaults give greedy decoding with no penalties.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 (or below) means greedy: always the most likely token.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probabilities add up to at least this (1 = off).
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Drop tokens less likely than this fraction of the most likely one (0 = off).
    pub min_p: f32,
    /// Seed of the random generator; `None` picks a fresh one per request. The same seed and
    /// parameters on the same model give the same output.
    pub seed: Option<u64>,
    /// Divide (or multiply, for negative logits) the logit of every token already present in
    /// the prompt's tail or the completion by this (1 = off), as llama.cpp does.
    pub repetition_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    pub repetition_window: usize,
    /// Subtracted once from the logit of every token already generated (OpenAI semantics).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was already generated.
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            repetition_window: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

impl SamplingParams {
    /// Checks that every value is in its meaningful range; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let finite = [
            ("temperature", self.temperature),
            ("top_p", self.top_p),
            ("min_p", self.min_p),
            ("repetition_penalty", self.repetition_penalty),
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ];
        if let Some((name, _)) = finite.iter().find(|(_, v)| !v.is_finite()) {
            return Err(format!("`{name}` must be a finite number"));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err("`temperature` must be between 0 and 2".into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err("`top_p` must be in (0, 1]".into());
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err("`min_p` must be between 0 and 1".into());
        }
        if self.repetition_penalty <= 0.0 {
            return Err("`repetition_penalty` must be positive".into());
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err("`presence_penalty` must be between -2 and 2".into());
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err("`frequency_penalty` must be between -2 and 2".into());
        }
        Ok(())
    }
}

/// Per-sequence sampling state: the RNG and the counts the penalties need.
///
/// Every sampled token takes exactly one value from the sequence's RNG, whatever the sampling
/// mode: the value seeds a generator private to that token, from which the choice (and any
/// retry of a constrained choice) draws. The sequence's RNG therefore only depends on how many
/// tokens were sampled, so [`Sampler::replay`] can bring a fresh sampler to the exact state of
/// one that generated given tokens without knowing the logits it saw.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    generated: HashMap<u32, u32>,
    recent: Vec<u32>,
}

impl Sampler {
    /// A sampler for one completion, seeded from the params (or the OS when no seed is given).
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let start = prompt.len().saturating_sub(params.repetition_window);
        Self {
            recent: prompt[start..].to_vec(),
            params,
            rng,
            generated: HashMap::new(),
        }
    }

    /// Records a generated token so later penalties see it.
    pub fn accept(&mut self, token: u32) {
        *self.generated.entry(token).or_default() += 1;
        self.recent.push(token);
        let window = self.params.repetition_window;
        if self.recent.len() > window.saturating_mul(2).max(1) {
            let drop = self.recent.len() - window;
            self.recent.drain(..drop);
        }
    }

    /// Brings the sampler to the state it would be in had it sampled `token` itself: the token
    /// is recorded for the penalties and the RNG advanced past that token's value.
    pub fn replay(&mut self, token: u32) {
        let _ = self.token_rng();
        self.accept(token);
    }

    /// The generator for one token, seeded with the sequence RNG's next value.
    fn token_rng(&mut self) -> StdRng {
        StdRng::seed_from_u64(self.rng.random::<u64>())
    }

    /// Picks the next token from raw logits (modified in place by the penalties).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        let mut rng = self.token_rng();
        self.choose(logits, &mut rng)
    }

    /// Picks the next token among those `allowed` accepts: a rejected token is masked out and
    /// the choice repeated, so the result follows the distribution restricted to allowed
    /// tokens. `None` when no token with any probability is allowed.
    pub fn sample_constrained(
        &mut self,
        logits: &mut [f32],
        mut allowed: impl FnMut(u32) -> bool,
    ) -> Option<u32> {
        self.apply_penalties(logits);
        let mut rng = self.token_rng();
        for _ in 0..logits.len() {
            if !logits.iter().any(|l| l.is_finite()) {
                return None;
            }
            let token = self.choose(logits, &mut rng);
            if allowed(token) {
                return Some(token);
            }
            if let Some(l) = logits.get_mut(token as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        None
    }

    fn choose(&self, logits: &[f32], rng: &mut StdRng) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, l)| (i as u32, *l / self.params.temperature))
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 && candidates.len() > self.params.top_k {
            candidates.truncate(self.params.top_k);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        let mut keep = probs.len();
        if self.params.min_p > 0.0 {
            let floor = probs[0] * self.params.min_p;
            keep = keep.min(probs.iter().take_while(|p| **p >= floor).count().max(1));
        }
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let n = probs
                .iter()
                .position(|p| {
                    acc += p;
                    acc >= self.params.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            keep = keep.min(n);
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut r = rng.random::<f32>() * total;
        for (i, p) in probs[..keep].iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return candidates[i].0;
            }
        }
        candidates[keep - 1].0
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let start = self.recent.len().saturating_sub(p.repetition_window);
            let mut seen: Vec<u32> = self.recent[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
    }
}

/// Index of the largest value; the lowest index wins ties so greedy decoding is reproducible.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-softmax of `logits`, computed in f64 for accuracy.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|l| (*l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|l| (*l as f64 - lse) as f32).collect()
}

/// The `k` most likely (token, log-probability) pairs, best first.
pub fn top_logprobs(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = logprobs
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, *l))
        .collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    idx.truncate(k);
    idx.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, -1.0, 0.5]
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(SamplingParams::default(), &[]);
        assert_eq!(s.sample(&mut logits()), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(42),
            ..Default::default()
        };
        let run = || {
            let mut s = Sampler::new(params.clone(), &[]);
            (0..50).map(|_| s.sample(&mut logits())).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
        let distinct: std::collections::HashSet<_> = run().into_iter().collect();
        assert!(distinct.len() > 1, "temperature 1 should explore");
    }

    /// Logits that differ from step to step, so a sampler's history matters.
    fn varied_logits(step: usize) -> Vec<f32> {
        (0..16)
            .map(|i| ((i * 7 + step * 3) % 11) as f32 * 0.3 - (i as f32) * 0.05)
            .collect()
    }

    #[test]
    fn replay_reproduces_the_rest_of_a_sampled_run() {
        let params = SamplingParams {
            temperature: 1.2,
            seed: Some(7),
            presence_penalty: 0.4,
            frequency_penalty: 0.3,
            repetition_penalty: 1.3,
            repetition_window: 4,
            ..Default::default()
        };
        // Constrained steps reject some candidates, so they draw more than once.
        let pick = |s: &mut Sampler, step: usize| {
            if step.is_multiple_of(3) {
                s.sample_constrained(&mut varied_logits(step), |t| t % 2 == 1)
                    .unwrap()
            } else {
                s.sample(&mut varied_logits(step))
            }
        };
        let prompt = [3, 5, 8];
        let mut full = Sampler::new(params.clone(), &prompt);
        let tokens: Vec<u32> = (0..40)
            .map(|step| {
                let t = pick(&mut full, step);
                full.accept(t);
                t
            })
            .collect();
        assert!(
            tokens
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 3
        );
        for cut in [0, 1, 3, 17, 39] {
            let mut resumed = Sampler::new(params.clone(), &prompt);
            for t in &tokens[..cut] {
                resumed.replay(*t);
            }
            let rest: Vec<u32> = (cut..40)
                .map(|step| {
                    let t = pick(&mut resumed, step);
                    resumed.accept(t);
                    t
                })
                .collect();
            assert_eq!(rest, tokens[cut..], "cut after {cut} tokens");
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let params = SamplingParams {
            temperature: 1.5,
            top_k: 1,
            seed: Some(7),
            ..Default::default()
        };
        let mut s = Sampler::new(params, &[]);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits()), 1);
        }
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        for params in [
            SamplingParams {
                temperature: 1.0,
                min_p: 0.5,
                seed: Some(1),
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 0.6,
                seed: Some(1),
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(params, &[]);
            for _ in 0..100 {
                let t = s.sample(&mut logits());
                assert!(t == 1 || t == 2, "sampled {t} from the tail");
            }
        }
    }

    #[test]
    fn penalties_discourage_repeats() {
        let params = SamplingParams {
            presence_penalty: 1.0,
            frequency_penalty: 0.5,
            ..Default::default()
        };
        let mut s = Sampler::new(params, &[]);
        s.accept(1);
        // token 1: 3.0 - 1.0 - 0.5 = 1.5 < 2.5
        assert_eq!(s.sample(&mut logits()), 2);
        let rep = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(rep, &[1]);
        assert_eq!(s.sample(&mut logits()), 2);
    }

    #[test]
    fn constrained_sampling_skips_rejected_tokens() {
        let mut s = Sampler::new(SamplingParams::default(), &[]);
        assert_eq!(
            s.sample_constrained(&mut logits(), |t| t != 1 && t != 2),
            Some(0)
        );
        let mut s = Sampler::new(SamplingParams::default(), &[]);
        assert_eq!(s.sample_constrained(&mut logits(), |_| false), None);
    }

    #[test]
    fn validation_names_the_field() {
        let bad = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("top_p"));
        let bad = SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("temperature"));
    }

    #[test]
    fn log_softmax_normalises() {
        let lp = log_softmax(&logits());
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert_eq!(
            top_logprobs(&lp, 2).iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }
}
