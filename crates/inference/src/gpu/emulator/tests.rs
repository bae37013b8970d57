//! The kernels, run in the emulator at warp widths 32 and 64, against the CPU backend.

use std::sync::OnceLock;

use super::*;

fn emulator(warp: u32) -> &'static Emulator {
    static W32: OnceLock<Emulator> = OnceLock::new();
    static W64: OnceLock<Emulator> = OnceLock::new();
    let cell = if warp == 32 { &W32 } else { &W64 };
    cell.get_or_init(|| Emulator::compile(warp).unwrap())
}

#[test]
fn compiles_and_reports_its_warp() {
    for w in [32, 64] {
        assert_eq!(emulator(w).warp(), w);
    }
}
