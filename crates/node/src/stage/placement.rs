//! `--layers auto`: which blocks of a model a starting pod serves, chosen from what the mesh
//! already covers (as Petals servers choose their blocks) and sized by the memory it may use.
//!
//! A stage can only join a chain where another ends (a head plans its chain from block
//! boundaries), so the candidates start at block 0 or where an announced stage ends. Each
//! takes as many blocks as fit in the memory, ending where an announced stage starts (or at
//! the last block) when one is within reach, so that it chains on both sides. The pod takes
//! the candidate whose blocks are held by the fewest pods, then the one covering the most
//! blocks at that count, then the one repeating the fewest blocks others hold, then the first.
//!
//! A later stage placed this way reconsiders between requests ([`reconsider`]): when the
//! blocks it holds are all held by other pods too while some blocks are held by fewer, it
//! moves there. It never moves to blocks held by as many pods as the least held of its own
//! would be without it, so two such pods do not chase each other.

use std::fmt;
use std::str::FromStr;

use pod_inference::model::stage::{LayerRange, StageSizes};

use super::coverage;

/// Positions of attention cache a stage is sized for in each of its blocks: one 4,096-token
/// sequence, or several shorter ones.
pub const KV_POSITIONS: u64 = 4096;

/// What `--layers` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageLayers {
    /// These blocks.
    Blocks(LayerRange),
    /// The blocks the mesh covers least, as many as fit (decided at start, and reconsidered
    /// between requests by a later stage).
    Auto,
}

impl FromStr for StageLayers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        LayerRange::parse(s)
            .map(Self::Blocks)
            .map_err(|e| format!("{e} (or auto)"))
    }
}

impl fmt::Display for StageLayers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Blocks(r) => r.fmt(f),
            Self::Auto => f.write_str("auto"),
        }
    }
}

/// The blocks chosen, and what they cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// The blocks.
    pub layers: LayerRange,
    /// Bytes they take, with the attention-cache allowance.
    pub bytes: u64,
    /// Pods already holding the least covered of these blocks.
    pub coverage: usize,
}

/// `--layers auto` could not choose.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// Not one block fits where a stage could start.
    #[error(
        "--max-memory {budget} bytes holds no block this pod could serve: the smallest stage \
         that chains takes {needed} bytes"
    )]
    TooLittleMemory {
        /// The memory given.
        budget: u64,
        /// The smallest candidate's bytes.
        needed: u64,
    },
    /// The model file has no block.
    #[error("the model has no block")]
    NoBlocks,
}

/// Chooses the blocks of a model of `sizes` to serve within `budget` bytes, given the
/// `announced` ranges of the same model file.
pub fn choose(
    sizes: &StageSizes,
    budget: u64,
    announced: &[LayerRange],
) -> Result<Choice, PlacementError> {
    let total = sizes.total_layers();
    if total == 0 {
        return Err(PlacementError::NoBlocks);
    }
    let counts = coverage::per_block(announced, total);
    let mut starts: Vec<usize> = std::iter::once(0)
        .chain(announced.iter().map(|r| r.end).filter(|&e| e < total))
        .collect();
    starts.sort_unstable();
    starts.dedup();
    type Key = (usize, std::cmp::Reverse<usize>, usize, usize);
    let mut best: Option<(Key, Choice)> = None;
    let mut smallest = u64::MAX;
    for start in starts {
        smallest = smallest.min(sizes.bytes(span(start, start + 1), KV_POSITIONS));
        let Some(fit) = (start + 1..=total)
            .take_while(|&end| sizes.bytes(span(start, end), KV_POSITIONS) <= budget)
            .last()
        else {
            continue;
        };
        // End where an announced stage starts, or at the last block, when one is in reach.
        let end = announced
            .iter()
            .map(|r| r.start)
            .chain(std::iter::once(total))
            .filter(|&b| b > start && b <= fit)
            .max()
            .unwrap_or(fit);
        let window = &counts[start..end];
        let least = window.iter().copied().min().unwrap_or(0);
        let at_least = window.iter().filter(|&&c| c == least).count();
        let held: usize = window.iter().sum();
        let key = (least, std::cmp::Reverse(at_least), held, start);
        let layers = span(start, end);
        let choice = Choice {
            layers,
            bytes: sizes.bytes(layers, KV_POSITIONS),
            coverage: least,
        };
        if best.as_ref().is_none_or(|(k, _)| key < *k) {
            best = Some((key, choice));
        }
    }
    best.map(|(_, c)| c).ok_or(PlacementError::TooLittleMemory {
        budget,
        needed: smallest,
    })
}

/// Why an auto-placed stage moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// The blocks it leaves.
    pub from: LayerRange,
    /// Where to.
    pub to: Choice,
    /// Other pods holding the least held of the blocks it leaves.
    pub leaving_coverage: usize,
}

impl fmt::Display for Move {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "blocks {} are also held by {} other pods, blocks {} by {}",
            self.from, self.leaving_coverage, self.to.layers, self.to.coverage
        )
    }
}

/// Whether a stage serving `current` with `budget` bytes should move, given the ranges the
/// *other* pods announce (`others`, not its own): to what [`choose`] picks, when that holds
/// blocks fewer pods hold than the least held of `current` would be without it.
pub fn reconsider(
    sizes: &StageSizes,
    budget: u64,
    current: LayerRange,
    others: &[LayerRange],
) -> Option<Move> {
    let total = sizes.total_layers();
    let counts = coverage::per_block(others, total);
    let leaving_coverage = counts
        .get(current.start..current.end.min(total))?
        .iter()
        .copied()
        .min()?;
    let to = choose(sizes, budget, others).ok()?;
    (to.layers != current && to.coverage < leaving_coverage).then_some(Move {
        from: current,
        to,
        leaving_coverage,
    })
}

fn span(start: usize, end: usize) -> LayerRange {
    LayerRange { start, end }
}

/// Memory the system can give without swapping: `MemAvailable` from `/proc/meminfo`, capped
/// by a cgroup v2 `memory.max` (less what the cgroup already uses).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    let available = kib * 1024;
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .map(|max| max.saturating_sub(read("/sys/fs/cgroup/memory.current").unwrap_or(0)));
    Some(cgroup.map_or(available, |c| c.min(available)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: u64 = 100;
    const EMBED: u64 = 300;
    const KV: u64 = 1;

    /// A 30-block model: 100 bytes a block, 300 of embeddings, a tied head, and one byte of
    /// cache per position per block.
    fn sizes() -> StageSizes {
        StageSizes {
            blocks: vec![BLOCK; 30],
            embeddings: EMBED,
            output_norm: 10,
            output: None,
            kv_per_position: KV,
        }
    }

    fn r(first: usize, last: usize) -> LayerRange {
        span(first, last + 1)
    }

    /// Memory for `blocks` blocks, their cache, and the embeddings (or head) once.
    fn room(blocks: u64) -> u64 {
        blocks * (BLOCK + KV * KV_POSITIONS) + EMBED + 10
    }

    #[test]
    fn auto_parses_beside_block_ranges() {
        assert_eq!("auto".parse::<StageLayers>().unwrap(), StageLayers::Auto);
        assert_eq!(
            "15-29".parse::<StageLayers>().unwrap(),
            StageLayers::Blocks(r(15, 29))
        );
        assert!("everything".parse::<StageLayers>().is_err());
        assert_eq!(StageLayers::Auto.to_string(), "auto");
    }

    #[test]
    fn an_empty_mesh_gets_a_head_as_large_as_fits_or_the_whole_model() {
        let s = sizes();
        let head = choose(&s, room(15), &[]).unwrap();
        assert_eq!(head.layers, r(0, 14));
        assert_eq!(head.coverage, 0);
        assert!(head.bytes <= room(15));
        let whole = choose(&s, u64::MAX, &[]).unwrap();
        assert_eq!(whole.layers, r(0, 29));
        // The whole model holds its tied embedding table once.
        assert_eq!(whole.bytes, s.bytes(r(0, 29), KV_POSITIONS));
    }

    #[test]
    fn the_uncovered_blocks_after_a_head_are_taken_up_to_the_last() {
        let s = sizes();
        // Room for 15 blocks and the head: exactly the rest.
        assert_eq!(choose(&s, room(15), &[r(0, 14)]).unwrap().layers, r(15, 29));
        // Room for more than the rest but not the whole model: still the rest, all of it
        // uncovered, rather than a second head covering fewer new blocks.
        assert_eq!(choose(&s, room(25), &[r(0, 14)]).unwrap().layers, r(15, 29));
        // Room for fewer: the first uncovered ones, chaining after the head.
        let part = choose(&s, room(10) - EMBED, &[r(0, 14)]).unwrap();
        assert_eq!(part.layers, r(15, 24));
        assert_eq!(part.coverage, 0);
        // The next pod takes what is left.
        assert_eq!(
            choose(&s, room(10), &[r(0, 14), r(15, 24)]).unwrap().layers,
            r(25, 29)
        );
    }

    #[test]
    fn a_range_ends_where_a_stage_starts_so_it_chains_on_both_sides() {
        let s = sizes();
        // A tail from 20 exists; the head stops at 19 even with room for more.
        let head = choose(&s, room(25), &[r(20, 29)]).unwrap();
        assert_eq!(head.layers, r(0, 19));
        // The gap between a head and a tail is filled exactly.
        let mid = choose(&s, room(10), &[r(0, 9), r(20, 29)]).unwrap();
        assert_eq!(mid.layers, r(10, 19));
    }

    #[test]
    fn ties_go_to_the_least_covered_then_the_most_blocks_then_the_first() {
        let s = sizes();
        // Everything held once: a second copy starting at block 0.
        let again = choose(&s, room(10), &[r(0, 9), r(10, 19), r(20, 29)]).unwrap();
        assert_eq!(again.layers, r(0, 9));
        assert_eq!(again.coverage, 1);
        // Blocks 0-9 held twice, the rest once: the copy goes where one pod holds them.
        let covered = [r(0, 9), r(0, 9), r(10, 19), r(20, 29)];
        assert_eq!(choose(&s, room(10), &covered).unwrap().layers, r(10, 19));
        // Two gaps, 5-7 and 20-21: the larger one, and only it rather than a second head
        // that would also fill it.
        let gaps = [r(0, 4), r(8, 19), r(22, 29)];
        let gap_choice = choose(&s, room(10), &gaps).unwrap();
        assert_eq!(gap_choice.coverage, 0);
        assert_eq!(gap_choice.layers, r(5, 7));
    }

    #[test]
    fn a_stage_moves_only_from_blocks_others_hold_to_blocks_fewer_hold() {
        let s = sizes();
        // Alone on 10-19 between a head and a tail: it stays.
        assert_eq!(
            reconsider(&s, room(10), r(10, 19), &[r(0, 9), r(20, 29)]),
            None
        );
        // Another pod holds 10-19 too and the tail is gone: it moves to the uncovered tail.
        let m = reconsider(&s, room(10), r(10, 19), &[r(0, 9), r(10, 19)]).unwrap();
        assert_eq!(m.to.layers, r(20, 29));
        assert_eq!((m.to.coverage, m.leaving_coverage), (0, 1));
        // The head is gone while another pod holds its own blocks: it becomes a head.
        let m = reconsider(&s, room(15), r(15, 29), &[r(15, 29)]).unwrap();
        assert_eq!(m.to.layers, r(0, 14));
        // Everything held once besides it: moving would only trade one copy for another.
        assert_eq!(
            reconsider(&s, room(10), r(10, 19), &[r(0, 9), r(10, 19), r(20, 29)]),
            None
        );
        // Nothing fits, or a range past the model's end: no move.
        assert_eq!(reconsider(&s, 50, r(10, 19), &[r(10, 19)]), None);
        assert_eq!(reconsider(&s, room(10), r(40, 49), &[]), None);
    }

    #[test]
    fn memory_for_no_block_is_an_error_naming_the_smallest_stage() {
        let s = sizes();
        let err = choose(&s, 50, &[]).unwrap_err();
        assert_eq!(
            err,
            PlacementError::TooLittleMemory {
                budget: 50,
                needed: s.bytes(r(0, 0), KV_POSITIONS)
            }
        );
        // A middle block needs no embeddings: it fits where a head would not.
        let mid = choose(&s, BLOCK + KV * KV_POSITIONS, &[r(0, 14)]).unwrap();
        assert_eq!(mid.layers, r(15, 15));
    }
}
