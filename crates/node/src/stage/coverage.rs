//! What the stages a mesh announces cover of one model file: whether they chain from the
//! first block to the last, and how many pods hold each block.

use pod_inference::model::stage::LayerRange;

/// Whether `stages` chain from block 0 to `total`, each starting where the one before ends.
pub fn chains(stages: &[LayerRange], total: usize) -> bool {
    let weighted: Vec<(LayerRange, u128)> = stages.iter().map(|s| (*s, 0)).collect();
    total > 0 && shortest_chain(&weighted, 0, total).is_ok()
}

/// The chain of `stages` from block `from` to `total` with the fewest hops, and among those the
/// least total weight (each stage's second field): the indices of its stages in order. Every
/// chain is considered, not only the one taking the furthest-reaching stage at each
/// boundary, which can miss one (0-9 then 10-29 when 0-14 leads nowhere). Fails with the
/// furthest block a chain reaches, where none goes on.
pub fn shortest_chain(
    stages: &[(LayerRange, u128)],
    from: usize,
    total: usize,
) -> Result<Vec<usize>, usize> {
    if from >= total {
        return Ok(Vec::new());
    }
    // best[b]: the cheapest way to reach boundary b, as (hops, weight, last stage).
    let mut best: Vec<Option<(usize, u128, usize)>> = vec![None; total + 1];
    best[from] = Some((0, 0, usize::MAX));
    for at in from..total {
        let Some((hops, weight, _)) = best[at] else {
            continue;
        };
        for (i, (range, w)) in stages.iter().enumerate() {
            if range.start != at || range.end <= at || range.end > total {
                continue;
            }
            let cost = (hops + 1, weight.saturating_add(*w), i);
            if best[range.end].is_none_or(|(h, wt, _)| (cost.0, cost.1) < (h, wt)) {
                best[range.end] = Some(cost);
            }
        }
    }
    if best[total].is_none() {
        let reached = (from..=total).rev().find(|&b| best[b].is_some());
        return Err(reached.unwrap_or(from));
    }
    let mut chain = Vec::new();
    let mut at = total;
    while at > from {
        let Some((_, _, i)) = best[at] else {
            return Err(at);
        };
        chain.push(i);
        at = stages[i].0.start;
    }
    chain.reverse();
    Ok(chain)
}

/// How many of `stages` hold each of the `total` blocks.
pub fn per_block(stages: &[LayerRange], total: usize) -> Vec<usize> {
    let mut counts = vec![0; total];
    for s in stages {
        for c in counts.iter_mut().take(s.end.min(total)).skip(s.start) {
            *c += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: usize, last: usize) -> LayerRange {
        LayerRange {
            start: first,
            end: last + 1,
        }
    }

    #[test]
    fn stages_chain_only_when_each_starts_where_one_ends() {
        assert!(chains(&[r(0, 14), r(15, 29)], 30));
        assert!(chains(&[r(15, 29), r(0, 9), r(10, 14)], 30));
        assert!(!chains(&[r(0, 14)], 30));
        assert!(!chains(&[r(15, 29)], 30));
        // Overlapping but not starting at a boundary: no chain.
        assert!(!chains(&[r(0, 14), r(10, 29)], 30));
        assert!(chains(&[r(0, 14), r(15, 19), r(15, 24), r(25, 29)], 30));
        // The furthest-reaching stage at block 0 leads nowhere; the shorter one does.
        assert!(chains(&[r(0, 14), r(0, 9), r(10, 29)], 30));
        assert!(!chains(&[], 0));
        assert!(!chains(&[r(0, 40)], 30));
    }

    #[test]
    fn the_chain_has_the_fewest_hops_then_the_least_weight() {
        let stages = [
            (r(0, 14), 0),
            (r(0, 9), 5),
            (r(10, 29), 5),
            (r(15, 19), 0),
            (r(15, 29), 7),
            (r(10, 14), 1),
        ];
        // Two hops three ways: 0-14 + 15-29 (weight 7) beats 0-9 + 10-29 (weight 10).
        assert_eq!(shortest_chain(&stages, 0, 30), Ok(vec![0, 4]));
        // Without 15-29, the shorter first stage is the only way.
        assert_eq!(shortest_chain(&stages[..4], 0, 30), Ok(vec![1, 2]));
        // From block 15, one hop.
        assert_eq!(shortest_chain(&stages, 15, 30), Ok(vec![4]));
        // Nothing goes on from block 20: the furthest block reached is named.
        assert_eq!(
            shortest_chain(&[(r(0, 9), 0), (r(10, 19), 0)], 0, 30),
            Err(20)
        );
        assert_eq!(shortest_chain(&[(r(5, 9), 0)], 0, 30), Err(0));
        assert_eq!(shortest_chain(&[], 30, 30), Ok(vec![]));
    }

    #[test]
    fn blocks_count_every_stage_that_holds_them() {
        let counts = per_block(&[r(0, 14), r(10, 19), r(50, 60)], 20);
        assert_eq!(counts[0], 1);
        assert_eq!(counts[9], 1);
        assert_eq!(counts[10], 2);
        assert_eq!(counts[14], 2);
        assert_eq!(counts[15], 1);
        assert_eq!(counts[19], 1);
        assert_eq!(counts.len(), 20);
    }
}
