//! The little of ELF that compile facts need: sections, symbols and notes of a 64-bit
//! little-endian object (an AMDGPU code object or an NVIDIA cubin). Reads only; every offset
//! is bounds-checked, so a damaged object gives an error, not a panic.

/// Why a code object could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("code object is not a readable ELF: {0}")]
pub struct ElfError(&'static str);

const SHT_SYMTAB: u32 = 2;
const SHT_NOTE: u32 = 7;
/// `STT_FUNC`: a symbol that names a function (an NVIDIA kernel, an AMD kernel's code).
pub(crate) const STT_FUNC: u8 = 2;

/// One section header.
#[derive(Debug, Clone)]
pub(crate) struct Section {
    pub(crate) name: String,
    pub(crate) kind: u32,
    offset: usize,
    size: usize,
    link: u32,
}

/// One symbol of the symbol table.
#[derive(Debug, Clone)]
pub(crate) struct Symbol {
    /// Its index in the table, which NVIDIA's `.nv.info` attributes refer to.
    pub(crate) index: u32,
    pub(crate) name: String,
    pub(crate) kind: u8,
}

/// One ELF note.
#[derive(Debug, Clone)]
pub(crate) struct Note<'a> {
    pub(crate) owner: &'a str,
    pub(crate) kind: u32,
    pub(crate) desc: &'a [u8],
}

/// A parsed ELF object borrowing its bytes.
#[derive(Debug)]
pub(crate) struct Elf<'a> {
    data: &'a [u8],
    pub(crate) sections: Vec<Section>,
}

fn slice(data: &[u8], offset: usize, len: usize) -> Result<&[u8], ElfError> {
    offset
        .checked_add(len)
        .and_then(|end| data.get(offset..end))
        .ok_or(ElfError("an offset points past the end"))
}

fn u16_at(data: &[u8], offset: usize) -> Result<u16, ElfError> {
    let b = slice(data, offset, 2)?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(data: &[u8], offset: usize) -> Result<u32, ElfError> {
    let b = slice(data, offset, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(data: &[u8], offset: usize) -> Result<usize, ElfError> {
    let b = slice(data, offset, 8)?;
    let mut word = [0u8; 8];
    word.copy_from_slice(b);
    usize::try_from(u64::from_le_bytes(word)).map_err(|_| ElfError("an offset does not fit"))
}

fn c_str_at(table: &[u8], offset: usize) -> String {
    let tail = table.get(offset..).unwrap_or_default();
    super::super::library::c_string(tail)
}

impl<'a> Elf<'a> {
    /// Reads the section headers of `data`.
    pub(crate) fn parse(data: &'a [u8]) -> Result<Self, ElfError> {
        if data.get(..4) != Some(b"\x7fELF".as_slice()) {
            return Err(ElfError("no ELF magic"));
        }
        if data.get(4) != Some(&2) || data.get(5) != Some(&1) {
            return Err(ElfError("not 64-bit little-endian"));
        }
        let shoff = u64_at(data, 0x28)?;
        let shentsize = usize::from(u16_at(data, 0x3a)?);
        let shnum = usize::from(u16_at(data, 0x3c)?);
        let shstrndx = usize::from(u16_at(data, 0x3e)?);
        if shentsize < 0x40 {
            return Err(ElfError("section headers too small"));
        }
        let mut raw = Vec::with_capacity(shnum);
        for i in 0..shnum {
            let at = shoff + i * shentsize;
            raw.push((
                u32_at(data, at)?,
                u32_at(data, at + 4)?,
                u64_at(data, at + 0x18)?,
                u64_at(data, at + 0x20)?,
                u32_at(data, at + 0x28)?,
            ));
        }
        let names = match raw.get(shstrndx) {
            Some(&(_, _, offset, size, _)) => slice(data, offset, size)?,
            None => &[],
        };
        let sections = raw
            .into_iter()
            .map(|(name, kind, offset, size, link)| Section {
                name: c_str_at(names, name as usize),
                kind,
                offset,
                size,
                link,
            })
            .collect();
        Ok(Self { data, sections })
    }

    /// The bytes of a section (empty for one that occupies no file space).
    pub(crate) fn section_data(&self, section: &Section) -> Result<&'a [u8], ElfError> {
        slice(self.data, section.offset, section.size)
    }

    /// The section called `name`.
    pub(crate) fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// Every symbol of the symbol table, with its index.
    pub(crate) fn symbols(&self) -> Result<Vec<Symbol>, ElfError> {
        let Some(table) = self.sections.iter().find(|s| s.kind == SHT_SYMTAB) else {
            return Ok(Vec::new());
        };
        let strings = match self.sections.get(table.link as usize) {
            Some(s) => self.section_data(s)?,
            None => &[],
        };
        let data = self.section_data(table)?;
        let mut out = Vec::new();
        for (index, entry) in data.chunks_exact(24).enumerate() {
            out.push(Symbol {
                index: u32::try_from(index).map_err(|_| ElfError("too many symbols"))?,
                name: c_str_at(strings, u32_at(entry, 0)? as usize),
                kind: entry[4] & 0xf,
            });
        }
        Ok(out)
    }

    /// Every note of every note section.
    pub(crate) fn notes(&self) -> Result<Vec<Note<'a>>, ElfError> {
        let mut out = Vec::new();
        for section in self.sections.iter().filter(|s| s.kind == SHT_NOTE) {
            let data = self.section_data(section)?;
            let mut at = 0;
            while at + 12 <= data.len() {
                let name_len = u32_at(data, at)? as usize;
                let desc_len = u32_at(data, at + 4)? as usize;
                let kind = u32_at(data, at + 8)?;
                let name_at = at + 12;
                let desc_at = name_at + name_len.next_multiple_of(4);
                let owner = slice(data, name_at, name_len)?;
                let owner = std::str::from_utf8(owner)
                    .map_err(|_| ElfError("a note's owner is not UTF-8"))?
                    .trim_end_matches('\0');
                out.push(Note {
                    owner,
                    kind,
                    desc: slice(data, desc_at, desc_len)?,
                });
                at = desc_at + desc_len.next_multiple_of(4);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Elf::parse(b"").is_err());
        assert!(Elf::parse(b"\x7fELF\x01\x01").is_err());
        let mut header = vec![0u8; 64];
        header[..6].copy_from_slice(b"\x7fELF\x02\x01");
        header[0x28] = 0xff; // section headers past the end
        header[0x3a] = 0x40;
        header[0x3c] = 1;
        assert!(Elf::parse(&header).is_err());
    }
}
