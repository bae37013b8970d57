//! Per-kernel facts read from a compiled code object: registers, scratch, spills.
//!
//! - AMD: the `NT_AMDGPU_METADATA` note (owner `AMDGPU`, type 32, MessagePack) lists each
//!   kernel under `amdhsa.kernels` with `.vgpr_count`, `.sgpr_count`,
//!   `.private_segment_fixed_size` and the spill counts.
//! - NVIDIA: the cubin's `.nv.info` section holds `EIATTR_REGCOUNT` and `EIATTR_FRAME_SIZE`
//!   per kernel symbol; spills are not in the cubin, only in ptxas's report in the compile log
//!   (asked for with `--ptxas-options=-v`), which is parsed when present.

use super::elf::{Elf, STT_FUNC};
use super::msgpack::{self, Value};

/// What the compiler tells of one kernel; `None` where the tools did not say.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelFacts {
    /// The kernel's `extern "C"` name.
    pub name: String,
    /// Vector registers per lane (AMD VGPRs; NVIDIA registers per thread).
    pub registers: Option<u32>,
    /// Scalar registers per wave (AMD SGPRs only).
    pub scalar_registers: Option<u32>,
    /// Per-thread private memory, bytes (AMD private segment; NVIDIA stack frame).
    pub private_bytes: Option<u32>,
    /// Registers spilled to memory (AMD: VGPR plus SGPR spills).
    pub spilled_registers: Option<u32>,
    /// Bytes of spill stores per thread (NVIDIA, from ptxas's report).
    pub spill_store_bytes: Option<u32>,
}

/// Why facts could not be read from a code object.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FactsError {
    /// The code object is not a readable ELF.
    #[error(transparent)]
    Elf(#[from] super::elf::ElfError),
    /// The AMDGPU metadata note is damaged.
    #[error(transparent)]
    Metadata(#[from] msgpack::DecodeError),
    /// A requested kernel is not in the code object (misspelt, or not `extern "C"`).
    #[error("kernel {0:?} is not in the compiled code object (is it extern \"C\" __global__?)")]
    MissingKernel(String),
}

const NT_AMDGPU_METADATA: u32 = 32;

/// Facts of `kernels` from an AMDGPU code object.
pub(crate) fn amd(code: &[u8], kernels: &[&str]) -> Result<Vec<KernelFacts>, FactsError> {
    let elf = Elf::parse(code)?;
    require_symbols(&elf, kernels)?;
    let mut listed = Vec::new();
    for note in elf.notes()? {
        if note.owner == "AMDGPU" && note.kind == NT_AMDGPU_METADATA {
            let metadata = msgpack::decode(note.desc)?;
            if let Some(entries) = metadata.get("amdhsa.kernels").and_then(Value::as_array) {
                listed.extend(entries.iter().cloned());
            }
        }
    }
    Ok(kernels
        .iter()
        .map(|&name| {
            let entry = listed
                .iter()
                .find(|k| k.get(".name").and_then(Value::as_str) == Some(name));
            let field = |key: &str| entry.and_then(|k| k.get(key)).and_then(Value::as_u32);
            let spills = match (field(".vgpr_spill_count"), field(".sgpr_spill_count")) {
                (None, None) => None,
                (v, s) => Some(v.unwrap_or(0) + s.unwrap_or(0)),
            };
            KernelFacts {
                name: name.into(),
                registers: field(".vgpr_count"),
                scalar_registers: field(".sgpr_count"),
                private_bytes: field(".private_segment_fixed_size"),
                spilled_registers: spills,
                spill_store_bytes: None,
            }
        })
        .collect())
}

const EIFMT_SVAL: u8 = 4;
const EIATTR_FRAME_SIZE: u8 = 0x11;
const EIATTR_REGCOUNT: u8 = 0x2f;

/// Facts of `kernels` from a cubin and NVRTC's log.
pub(crate) fn nvidia(
    code: &[u8],
    log: &str,
    kernels: &[&str],
) -> Result<Vec<KernelFacts>, FactsError> {
    let elf = Elf::parse(code)?;
    let symbols = require_symbols(&elf, kernels)?;
    let mut registers = Vec::new();
    let mut frames = Vec::new();
    if let Some(section) = elf.section(".nv.info") {
        let data = elf.section_data(section)?;
        // Each attribute is a 4-byte header (format, attribute, u16); the u16 is the value
        // of the short formats and the payload size of EIFMT_SVAL, whose payload follows.
        let mut at = 0;
        while let Some(header) = data.get(at..at + 4) {
            let (format, attribute) = (header[0], header[1]);
            let short = usize::from(u16::from_le_bytes([header[2], header[3]]));
            at += 4;
            let payload = if format == EIFMT_SVAL {
                let Some(payload) = data.get(at..at + short) else {
                    break;
                };
                at += short;
                payload
            } else {
                &[][..]
            };
            if format == EIFMT_SVAL && payload.len() == 8 {
                let symbol = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
                let value = u32::from_le_bytes([payload[4], payload[5], payload[6], payload[7]]);
                match attribute {
                    EIATTR_REGCOUNT => registers.push((symbol, value)),
                    EIATTR_FRAME_SIZE => frames.push((symbol, value)),
                    _ => {}
                }
            }
        }
    }
    let reported = ptxas_report(log);
    Ok(kernels
        .iter()
        .zip(symbols)
        .map(|(&name, index)| {
            let lookup =
                |list: &[(u32, u32)]| list.iter().find(|(s, _)| *s == index).map(|(_, v)| *v);
            let from_log = reported.iter().find(|r| r.name == name);
            KernelFacts {
                name: name.into(),
                registers: lookup(&registers).or(from_log.and_then(|r| r.registers)),
                scalar_registers: None,
                private_bytes: lookup(&frames).or(from_log.and_then(|r| r.private_bytes)),
                spilled_registers: None,
                spill_store_bytes: from_log.and_then(|r| r.spill_store_bytes),
            }
        })
        .collect())
}

/// The symbol-table index of each kernel, or which one is missing.
fn require_symbols(elf: &Elf<'_>, kernels: &[&str]) -> Result<Vec<u32>, FactsError> {
    let symbols = elf.symbols()?;
    kernels
        .iter()
        .map(|&name| {
            symbols
                .iter()
                .find(|s| s.name == name && s.kind == STT_FUNC)
                .map(|s| s.index)
                .ok_or_else(|| FactsError::MissingKernel(name.into()))
        })
        .collect()
}

/// Parses ptxas's `-v` report: per entry function, its registers, stack frame and spill
/// stores.
fn ptxas_report(log: &str) -> Vec<KernelFacts> {
    let mut out: Vec<KernelFacts> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default();
            out.push(KernelFacts {
                name: name.into(),
                ..KernelFacts::default()
            });
            continue;
        }
        let Some(current) = out.last_mut() else {
            continue;
        };
        if line.contains("bytes stack frame") {
            current.private_bytes = number_before(line, "bytes stack frame");
            current.spill_store_bytes = number_before(line, "bytes spill stores");
        } else if let Some(rest) = line.split("Used ").nth(1) {
            current.registers = rest.split_whitespace().next().and_then(|n| n.parse().ok());
        }
    }
    out
}

fn number_before(line: &str, marker: &str) -> Option<u32> {
    let head = line.split(marker).next()?;
    head.split_whitespace().last()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_reports_give_registers_stack_and_spills_per_kernel() {
        let log = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'dot_i8' for 'sm_90'\n\
            ptxas info    : Function properties for dot_i8\n\
            ptxas         .     16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n\
            ptxas info    : Used 40 registers, used 0 barriers\n\
            ptxas info    : Compiling entry function 'vector_add' for 'sm_90'\n\
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 12 registers, used 0 barriers\n";
        let report = ptxas_report(log);
        assert_eq!(report.len(), 2);
        assert_eq!(report[0].name, "dot_i8");
        assert_eq!(report[0].registers, Some(40));
        assert_eq!(report[0].private_bytes, Some(16));
        assert_eq!(report[0].spill_store_bytes, Some(8));
        assert_eq!(report[1].registers, Some(12));
        assert_eq!(report[1].spill_store_bytes, Some(0));
    }
}
