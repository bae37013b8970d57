//! What the stages a mesh announces cover of one model file: whether they chain from the
//! first block to the last, and how many pods hold each block.

use pod_inference::model::stage::LayerRange;

/// Whether `stages` chain from block 0 to `total` the way a head plans its chain: at each
/// block boundary, the stage starting there that reaches furthest.
pub fn chains(stages: &[LayerRange], total: usize) -> bool {
    let mut at = 0;
    while at < total {
        let Some(end) = stages
            .iter()
            .filter(|s| s.start == at && s.end > at && s.end <= total)
            .map(|s| s.end)
            .max()
        else {
            return false;
        };
        at = end;
    }
    total > 0
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
        // The furthest stage at a boundary is taken, as a head plans it.
        assert!(chains(&[r(0, 14), r(15, 19), r(15, 24), r(25, 29)], 30));
        assert!(!chains(&[], 0));
        assert!(!chains(&[r(0, 40)], 30));
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
