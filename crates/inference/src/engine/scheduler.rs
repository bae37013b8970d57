//! The batching policy, as pure functions of where each sequence stands: which sequences step
//! together, how much of a prompt each step feeds, and in what order requests are admitted.
//!
//! Every step runs one forward pass per model over all its running sequences. Decoding
//! sequences feed their last sampled token, one each; prompts share what is left of the step's
//! token budget, first admitted first, and the first prompt always gets at least one token so
//! no prompt waits forever behind decoders. Requests are admitted first come, first served,
//! while fewer than `max_active` sequences run.

use std::ops::Range;

/// Where a running sequence stands, as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Progress {
    /// Tokens of its context (prompt, then resumed completion tokens) fed so far.
    pub(super) fed: usize,
    /// Length of its context.
    pub(super) context_len: usize,
    /// How many of the context's tokens are the prompt.
    pub(super) prompt_len: usize,
}

impl Progress {
    /// Whether the whole context is fed and the sequence now feeds the tokens it samples.
    pub(super) fn decoding(&self) -> bool {
        self.fed >= self.context_len
    }
}

/// What a sequence feeds in a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Feed {
    /// These positions of its context.
    Context(Range<usize>),
    /// The token it sampled last.
    Sampled,
}

/// How many waiting requests to admit now.
pub(super) fn admissions(running: usize, waiting: usize, max_active: usize) -> usize {
    max_active.max(1).saturating_sub(running).min(waiting)
}

/// The models to step, each once, in the order their first sequence appears (so the oldest
/// running sequence's model goes first).
pub(super) fn models_in_order<'a>(models: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut order: Vec<&str> = Vec::new();
    for m in models {
        if !order.contains(&m) {
            order.push(m);
        }
    }
    order
}

/// One step of one model: what each of `seqs` (an index chosen by the caller, and its
/// progress; in admission order) feeds, decoders first, then prompts while the `chunk`-token
/// budget lasts. `invariant`: the model gives the same logits however a context is split
/// (see [`BatchDecoder::batch_invariant`](crate::decoder::BatchDecoder::batch_invariant)).
pub(super) fn plan_step(
    seqs: &[(usize, Progress)],
    invariant: bool,
    chunk: usize,
) -> Vec<(usize, Feed)> {
    let chunk = chunk.max(1);
    let mut budget = chunk;
    let mut plan = Vec::with_capacity(seqs.len());
    for &(i, _) in seqs.iter().filter(|(_, p)| p.decoding()) {
        budget = budget.saturating_sub(1);
        plan.push((i, Feed::Sampled));
    }
    let mut prompting = false;
    for &(i, p) in seqs.iter().filter(|(_, p)| !p.decoding()) {
        if budget == 0 && prompting {
            continue;
        }
        let end = if invariant {
            // Prompt and resumed tokens alike: the model gives the same logits however they
            // are split.
            p.fed + budget.clamp(1, p.context_len - p.fed)
        } else if p.fed < p.prompt_len {
            (p.fed + chunk).min(p.prompt_len)
        } else {
            // Replayed one at a time, exactly as they were generated: other models'
            // multi-token passes round differently.
            p.fed + 1
        };
        budget = budget.saturating_sub(end - p.fed);
        prompting = true;
        plan.push((i, Feed::Context(p.fed..end)));
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(fed: usize, len: usize) -> Progress {
        Progress {
            fed,
            context_len: len,
            prompt_len: len,
        }
    }

    fn decoding(len: usize) -> Progress {
        prompt(len, len)
    }

    #[test]
    fn decoders_go_first_and_prompts_share_the_rest_in_order() {
        let seqs = [
            (0, prompt(0, 10)),
            (1, decoding(4)),
            (2, prompt(0, 10)),
            (3, decoding(7)),
        ];
        let plan = plan_step(&seqs, true, 8);
        assert_eq!(
            plan,
            vec![
                (1, Feed::Sampled),
                (3, Feed::Sampled),
                (0, Feed::Context(0..6)),
            ]
        );
    }

    #[test]
    fn a_prompt_gets_a_token_even_when_decoders_take_the_budget() {
        let mut seqs: Vec<(usize, Progress)> = (0..4).map(|i| (i, decoding(3))).collect();
        seqs.push((4, prompt(2, 9)));
        seqs.push((5, prompt(0, 9)));
        let plan = plan_step(&seqs, true, 2);
        assert_eq!(plan.len(), 5);
        assert_eq!(plan[4], (4, Feed::Context(2..3)));
    }

    #[test]
    fn prompts_split_by_the_budget_until_fed() {
        let seqs = [(0, prompt(0, 5)), (1, prompt(0, 5))];
        assert_eq!(
            plan_step(&seqs, true, 8),
            vec![(0, Feed::Context(0..5)), (1, Feed::Context(0..3))]
        );
        let seqs = [(0, prompt(5, 5)), (1, prompt(3, 5))];
        assert_eq!(
            plan_step(&seqs, true, 8),
            vec![(0, Feed::Sampled), (1, Feed::Context(3..5))]
        );
    }

    #[test]
    fn models_that_are_not_invariant_feed_whole_chunks_and_resumed_tokens_one_by_one() {
        let resumed = Progress {
            fed: 6,
            context_len: 9,
            prompt_len: 6,
        };
        let seqs = [(0, prompt(0, 20)), (1, resumed), (2, prompt(4, 6))];
        assert_eq!(
            plan_step(&seqs, false, 8),
            vec![(0, Feed::Context(0..8))],
            "the budget is spent after the first chunk"
        );
        assert_eq!(
            plan_step(&seqs[1..], false, 8),
            vec![(1, Feed::Context(6..7)), (2, Feed::Context(4..6))]
        );
    }

    #[test]
    fn admissions_fill_free_slots_only() {
        assert_eq!(admissions(0, 5, 2), 2);
        assert_eq!(admissions(1, 5, 2), 1);
        assert_eq!(admissions(2, 5, 2), 0);
        assert_eq!(admissions(3, 5, 2), 0);
        assert_eq!(admissions(0, 1, 4), 1);
        assert_eq!(admissions(0, 3, 0), 1, "at least one runs");
    }

    #[test]
    fn models_step_once_each_oldest_first() {
        assert_eq!(
            models_in_order(["b", "a", "b", "c", "a"]),
            vec!["b", "a", "c"]
        );
    }
}
