//! Manifests: a file's size and SHA-256 chaining value after each chunk, so that every chunk
//! is checked alone and all of them together are checked against the file's SHA-256; and the
//! manifests saved beside a store so a file is hashed once.

use std::fs::File;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::CHUNK_SIZE;

/// What a file is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// SHA-256 of the whole file, lowercase hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Bytes per chunk (the last one may be shorter).
    pub chunk_size: u64,
    /// SHA-256's chaining value after each chunk (its internal state, not the chunk's own
    /// hash), lowercase hex; the last one is the file's SHA-256.
    pub chunks: Vec<String>,
}

impl Manifest {
    /// Hashes a file into a manifest.
    pub fn of_file(path: &Path) -> std::io::Result<Manifest> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Self::of_reader(file, size, CHUNK_SIZE)
    }

    /// Hashes `size` bytes of `data` into a manifest of `chunk_size` chunks (a multiple of
    /// SHA-256's 64-byte block, so that a chunk ends where a block does).
    pub(super) fn of_reader(
        mut data: impl std::io::Read,
        size: u64,
        chunk_size: u64,
    ) -> std::io::Result<Manifest> {
        let count = size.div_ceil(chunk_size) as usize;
        let mut chunks = Vec::with_capacity(count);
        let mut buf = vec![0u8; chunk_size as usize];
        let mut state = SHA256_IV;
        for index in 0..count {
            let len = chunk_size.min(size - index as u64 * chunk_size) as usize;
            data.read_exact(&mut buf[..len])?;
            state = if index + 1 == count {
                sha256_finish(&state, &buf[..len], size)
            } else {
                sha256_chain(&state, &buf[..len])
            };
            chunks.push(state_hex(&state));
        }
        Ok(Manifest {
            sha256: chunks
                .last()
                .cloned()
                .unwrap_or_else(|| hex::encode(Sha256::digest([]))),
            size,
            chunk_size,
            chunks,
        })
    }

    /// Whether the manifest is consistent with a file of `sha256` and `size`: if it is, a file
    /// whose every chunk verifies hashes to `sha256`.
    pub(super) fn matches(&self, sha256: &str, size: u64) -> bool {
        self.sha256 == sha256
            && self.size == size
            && self.chunk_size == CHUNK_SIZE
            && self.chunks.len() as u64 == size.div_ceil(CHUNK_SIZE)
            && self
                .chunks
                .last()
                .map_or(hex::encode(Sha256::digest([])) == sha256, |last| {
                    last == sha256
                })
    }

    /// Whether `data` is chunk `index` of the file: SHA-256 run over it from the chaining value
    /// before it gives the one after it.
    pub fn verify_chunk(&self, index: usize, data: &[u8]) -> bool {
        if index >= self.chunks.len() || data.len() as u64 != self.chunk_len(index) {
            return false;
        }
        let before = match index {
            0 => SHA256_IV,
            _ => match parse_state(&self.chunks[index - 1]) {
                Some(s) => s,
                None => return false,
            },
        };
        let after = if index + 1 == self.chunks.len() {
            sha256_finish(&before, data, self.size)
        } else {
            sha256_chain(&before, data)
        };
        state_hex(&after) == self.chunks[index]
    }

    /// The length of chunk `index`: the chunk size, or less for the last one.
    pub(super) fn chunk_len(&self, index: usize) -> u64 {
        // A manifest from a peer may declare any chunk size: the product may overflow.
        let start = (index as u64).saturating_mul(self.chunk_size);
        self.chunk_size.min(self.size.saturating_sub(start))
    }
}

/// SHA-256's initial chaining value (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// SHA-256's compression over whole 64-byte blocks of `data` from `state`.
fn sha256_chain(state: &[u32; 8], data: &[u8]) -> [u32; 8] {
    let mut s = *state;
    for block in data.chunks_exact(64) {
        sha2::compress256(
            &mut s,
            std::slice::from_ref(sha2::digest::generic_array::GenericArray::from_slice(block)),
        );
    }
    s
}

/// The end of SHA-256: the last bytes of the message from `state`, then the padding with the
/// message's length `total` in bytes. The result, written big-endian, is the digest.
fn sha256_finish(state: &[u32; 8], data: &[u8], total: u64) -> [u32; 8] {
    let whole = data.len() / 64 * 64;
    let state = sha256_chain(state, &data[..whole]);
    let rest = &data[whole..];
    let mut tail = [0u8; 128];
    tail[..rest.len()].copy_from_slice(rest);
    tail[rest.len()] = 0x80;
    let end = if rest.len() + 9 <= 64 { 64 } else { 128 };
    tail[end - 8..end].copy_from_slice(&total.wrapping_mul(8).to_be_bytes());
    sha256_chain(&state, &tail[..end])
}

/// A chaining value as 64 lowercase hex digits (the digest's form).
fn state_hex(state: &[u32; 8]) -> String {
    hex::encode(
        state
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect::<Vec<u8>>(),
    )
}

fn parse_state(text: &str) -> Option<[u32; 8]> {
    let bytes = hex::decode(text).ok()?;
    if bytes.len() != 32 {
        return None;
    }
    let mut state = [0u32; 8];
    for (w, b) in state.iter_mut().zip(bytes.chunks_exact(4)) {
        *w = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    }
    Some(state)
}

/// The manifest of `file`, which should hash to `sha256`: the one saved at `saved` when it
/// describes a file of this size and hash, else made by hashing the file and saved there
/// (written whole, then renamed into place). The last chaining value of a saved manifest must be
/// `sha256`; a manifest damaged elsewhere would only make chunks fail their check at the
/// requester, which drops this provider.
pub(super) fn saved_manifest(saved: &Path, file: &Path, sha256: &str) -> std::io::Result<Manifest> {
    let size = std::fs::metadata(file)?.len();
    if let Ok(text) = std::fs::read(saved) {
        match serde_json::from_slice::<Manifest>(&text) {
            Ok(m) if m.matches(sha256, size) => return Ok(m),
            _ => tracing::warn!(path = %saved.display(), "ignoring a damaged saved manifest"),
        }
    }
    let manifest = Manifest::of_file(file)?;
    if manifest.sha256 == sha256 {
        save_manifest(saved, &manifest);
    }
    Ok(manifest)
}

/// Saves a manifest at `saved`, written whole and then renamed into place; a failure is only
/// logged (the manifest can be made again).
pub(super) fn save_manifest(saved: &Path, manifest: &Manifest) {
    let write = || -> std::io::Result<()> {
        let dir = saved.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        serde_json::to_writer(&mut tmp, manifest)?;
        tmp.as_file().sync_all()?;
        tmp.persist(saved).map_err(|e| e.error)?;
        Ok(())
    };
    if let Err(e) = write() {
        tracing::warn!(path = %saved.display(), error = %e, "cannot save a manifest");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_describe_files_chunk_by_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(CHUNK_SIZE * 2 + 10))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let m = Manifest::of_file(&path).unwrap();
        assert_eq!(m.size, data.len() as u64);
        assert_eq!(m.chunks.len(), 3);
        assert_eq!(m.sha256, hex::encode(Sha256::digest(&data)));
        assert_eq!(m.chunks[2], m.sha256);
        assert!(m.matches(&m.sha256.clone(), m.size));
        assert!(!m.matches(&m.sha256.clone(), m.size + 1));
        assert_eq!(m.chunk_len(2), 10);
        let chunk = |i: usize| {
            let start = i * CHUNK_SIZE as usize;
            &data[start..(start + CHUNK_SIZE as usize).min(data.len())]
        };
        for i in 0..3 {
            assert!(m.verify_chunk(i, chunk(i)), "chunk {i}");
            let mut bad = chunk(i).to_vec();
            bad[5] ^= 1;
            assert!(!m.verify_chunk(i, &bad), "corrupt chunk {i}");
        }
        // A chunk in another place, or cut short, does not verify.
        assert!(!m.verify_chunk(1, chunk(0)));
        assert!(!m.verify_chunk(2, &chunk(2)[..9]));
        assert!(!m.verify_chunk(3, chunk(2)));
    }

    #[test]
    fn chunked_sha256_equals_sha256_at_every_padding_boundary() {
        // Around the block (64) and padding (56) boundaries, and files of whole chunks.
        let sizes = [
            0,
            1,
            55,
            56,
            63,
            64,
            65,
            119,
            120,
            CHUNK_SIZE as usize - 1,
            CHUNK_SIZE as usize,
            CHUNK_SIZE as usize + 1,
            2 * CHUNK_SIZE as usize,
            2 * CHUNK_SIZE as usize + 56,
        ];
        let dir = tempfile::tempdir().unwrap();
        for size in sizes {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 % 253) as u8).collect();
            let path = dir.path().join(format!("f{size}"));
            std::fs::write(&path, &data).unwrap();
            let m = Manifest::of_file(&path).unwrap();
            let want = hex::encode(Sha256::digest(&data));
            assert_eq!(m.sha256, want, "size {size}");
            assert!(m.matches(&want, size as u64), "size {size}");
        }
    }

    #[test]
    fn a_forged_manifest_cannot_vouch_for_other_data() {
        // A manifest for other data, relabelled with the real file's hash: its chunks never
        // chain up to that hash, so the data it describes does not verify to the end.
        let dir = tempfile::tempdir().unwrap();
        let real: Vec<u8> = (0..CHUNK_SIZE as usize + 100).map(|i| i as u8).collect();
        let fake: Vec<u8> = real.iter().map(|b| b ^ 0x55).collect();
        std::fs::write(dir.path().join("real"), &real).unwrap();
        std::fs::write(dir.path().join("fake"), &fake).unwrap();
        let real_m = Manifest::of_file(&dir.path().join("real")).unwrap();
        let mut forged = Manifest::of_file(&dir.path().join("fake")).unwrap();
        assert!(!forged.matches(&real_m.sha256, real_m.size));
        forged.sha256.clone_from(&real_m.sha256);
        let last = forged.chunks.len() - 1;
        forged.chunks[last].clone_from(&real_m.sha256);
        assert!(forged.matches(&real_m.sha256, real_m.size));
        assert!(forged.verify_chunk(0, &fake[..CHUNK_SIZE as usize]));
        assert!(!forged.verify_chunk(last, &fake[CHUNK_SIZE as usize..]));
    }

    #[test]
    fn manifests_are_saved_and_a_damaged_one_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(2 * CHUNK_SIZE + 7))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let file = dir.path().join("f");
        std::fs::write(&file, &data).unwrap();
        let sha = hex::encode(Sha256::digest(&data));
        let saved = dir.path().join("m").join(format!("{sha}.json"));

        let made = saved_manifest(&saved, &file, &sha).unwrap();
        assert_eq!(made.sha256, sha);
        let on_disk: Manifest = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
        assert_eq!(on_disk, made);
        // A saved manifest is used as it is: the file is not read again.
        let mut marked = made.clone();
        marked.chunks[0] = "0".repeat(64);
        std::fs::write(&saved, serde_json::to_vec(&marked).unwrap()).unwrap();
        assert_eq!(saved_manifest(&saved, &file, &sha).unwrap(), marked);
        // One that does not end in the file's hash is made again, and saved again.
        let mut damaged = made.clone();
        damaged.chunks.pop();
        std::fs::write(&saved, serde_json::to_vec(&damaged).unwrap()).unwrap();
        assert_eq!(saved_manifest(&saved, &file, &sha).unwrap(), made);
        std::fs::write(&saved, b"{ not json").unwrap();
        assert_eq!(saved_manifest(&saved, &file, &sha).unwrap(), made);
        let on_disk: Manifest = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
        assert_eq!(on_disk, made);
        // A file that is not what its name says gets its real manifest, which is not saved.
        std::fs::remove_file(&saved).unwrap();
        let wrong = "1".repeat(64);
        let real = saved_manifest(&saved, &file, &wrong).unwrap();
        assert_eq!(real.sha256, sha);
        assert!(!saved.exists());
    }
}
