//! Work receipts: signed statements that one pod served an inference request for another, and
//! the append-only ledger in which both sides keep them.
//!
//! After serving a request, the server signs a [`Receipt`] with its node key and hands it to the
//! requester, which checks it with [`SignedReceipt::verify`]. Each side appends the receipt to its
//! own [`Ledger`] (as [`Role::Served`] or [`Role::Consumed`]), and [`Ledger::summary`] totals the
//! work exchanged with every peer. No third party is involved: a receipt proves only that the
//! server's key signed it.
//!
//! # Canonical encoding, version 1
//!
//! The signature is an ed25519 signature (RFC 8032, verified strictly) over these bytes:
//!
//! 1. the 14-byte domain-separation prefix `pod-receipt/1\0` (ASCII, ending in a zero byte),
//!    so that a receipt signature can never be mistaken for a signature made for anything else;
//! 2. each field of [`Receipt`] in this order: `request_id`, `model`, `prompt_tokens`,
//!    `completion_tokens`, `requester`, `server`, `started_at_ms`, `finished_at_ms`, `partial`,
//!    where
//!    - a string is its UTF-8 length as a big-endian `u32`, then its UTF-8 bytes (no terminator,
//!      no normalisation);
//!    - an integer is a big-endian `u64`;
//!    - a bool is one byte, `0` or `1`.
//!
//! # Canonical encoding, version 2: a pipeline stage's work
//!
//! A pipeline stage signs a receipt for the rows it ran through its blocks for one of a head's
//! sequences ([`Receipt::stage`]). Its bytes are those of version 1 with the prefix
//! `pod-receipt/2\0` instead, followed by the fields of [`StageWork`] in this order: `sha256`
//! (a string), `first_block`, `last_block`, `sequence`, `rows`, `passes` (integers). A receipt
//! without them is encoded as version 1, so every receipt signed before stages existed still
//! verifies, and neither version's signature can pass for the other's.
//!
//! The signing key is the one the `server` PeerId names: ed25519 PeerIds are an identity
//! multihash (code `0x00`) whose digest is libp2p's protobuf encoding of the public key, so a
//! verifier needs nothing besides the receipt. The signature travels as standard base64 (with
//! padding) of its 64 bytes.
//!
//! # Ledger file
//!
//! `$POD_HOME/receipts/ledger.jsonl`, mode 0600, one JSON object per line:
//! `{"role":"served","at_ms":..,"receipt":{..},"signature":".."}`. Each record is written with a
//! single append followed by `fdatasync`, so a crash leaves at most one torn line, at the end.
//! Readers skip lines that do not parse and count them in [`LedgerRead::torn`]; opening a ledger
//! whose last line is torn first ends that line, so that new records start on a line of their
//! own.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

/// Domain-separation prefix of the canonical encoding, version 1.
pub const CANONICAL_PREFIX: &[u8] = b"pod-receipt/1\0";

/// Domain-separation prefix of the canonical encoding, version 2 (a stage's receipt).
pub const CANONICAL_PREFIX_STAGE: &[u8] = b"pod-receipt/2\0";

/// Directory under `$POD_HOME` holding the ledger.
pub const RECEIPTS_DIR: &str = "receipts";

/// Name of the ledger file inside [`RECEIPTS_DIR`].
pub const LEDGER_FILE: &str = "ledger.jsonl";

/// Multihash code of the identity hash, which inlines the key in a PeerId.
const IDENTITY_MULTIHASH: u64 = 0x00;

/// `KeyType` value of ed25519 in libp2p's public key protobuf.
const ED25519_KEY_TYPE: u8 = 1;

/// Signing, verifying or storing a receipt failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    /// The receipt names another server than the key signing it.
    #[error("receipt names server {server} but the signing key is {signer}")]
    ServerMismatch {
        /// The `server` field of the receipt.
        server: String,
        /// The PeerId of the signing key.
        signer: String,
    },
    /// A string field is too long for the canonical encoding's `u32` length.
    #[error("receipt field {0} is longer than 4 GiB")]
    FieldTooLong(&'static str),
    /// The signature is not base64 of 64 bytes.
    #[error("malformed receipt signature: {0}")]
    BadSignatureEncoding(String),
    /// The key is not an ed25519 key: the signing keypair, or the key the server PeerId names.
    #[error("unsupported key type: {0}")]
    UnsupportedKeyType(String),
    /// The `server` field is not a PeerId, or its embedded public key cannot be decoded.
    #[error("bad server PeerId {peer}: {reason}")]
    BadPeerId {
        /// The `server` field of the receipt.
        peer: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The signature does not match the receipt and the server's key.
    #[error("receipt signature does not verify for server {server}")]
    BadSignature {
        /// The `server` field of the receipt.
        server: String,
    },
    /// The blocking task writing a record ended before it could say how the write went.
    #[error("the ledger write was cancelled: {0}")]
    WriteCancelled(String),
    /// A ledger record could not be encoded as JSON.
    #[error("encoding a ledger record: {0}")]
    Encode(#[source] serde_json::Error),
    /// The ledger file or its directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ReceiptError + '_ {
    move |source| ReceiptError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What a server states about one request it served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The request's id, a uuid chosen by the requester.
    pub request_id: String,
    /// The model that served it.
    pub model: String,
    /// Input tokens the server processed.
    pub prompt_tokens: u64,
    /// Tokens the server generated.
    pub completion_tokens: u64,
    /// PeerId (base58) of the pod that asked.
    pub requester: String,
    /// PeerId (base58) of the pod that served, whose key signs the receipt.
    pub server: String,
    /// When serving started, unix milliseconds.
    pub started_at_ms: u64,
    /// When serving ended, unix milliseconds.
    pub finished_at_ms: u64,
    /// The work was cut short (the server died or the request failed over): the receipt
    /// accounts for the progress made so far.
    pub partial: bool,
    /// Present where the server is a pipeline stage: what it ran for one of the head's
    /// sequences. `prompt_tokens` is then the rows (positions) it ran, replays included, and
    /// `completion_tokens` is 0: the head samples the tokens. `None`: a whole request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<StageWork>,
}

/// What a pipeline stage ran for one sequence of a head (the requester).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageWork {
    /// SHA-256 of the model file whose blocks ran.
    pub sha256: String,
    /// The first block the stage ran.
    pub first_block: u64,
    /// The last block the stage ran (inclusive).
    pub last_block: u64,
    /// The head's id of the sequence.
    pub sequence: u64,
    /// Rows (positions) run through the blocks, replays included.
    pub rows: u64,
    /// Passes that carried rows of the sequence: its prompt, then one per decode step.
    pub passes: u64,
}

impl Receipt {
    /// The bytes the signature covers, in the encoding described in the module docs.
    ///
    /// A string longer than `u32::MAX` bytes cannot be encoded faithfully; its length saturates,
    /// and [`SignedReceipt::sign`] and [`SignedReceipt::verify`] refuse such a receipt.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let strings = self.request_id.len() + self.model.len() + self.requester.len();
        let stage = self.stage.as_ref().map_or(0, |s| s.sha256.len() + 44);
        let mut out =
            Vec::with_capacity(CANONICAL_PREFIX.len() + strings + self.server.len() + stage + 64);
        out.extend_from_slice(if self.stage.is_some() {
            CANONICAL_PREFIX_STAGE
        } else {
            CANONICAL_PREFIX
        });
        put_str(&mut out, &self.request_id);
        put_str(&mut out, &self.model);
        out.extend_from_slice(&self.prompt_tokens.to_be_bytes());
        out.extend_from_slice(&self.completion_tokens.to_be_bytes());
        put_str(&mut out, &self.requester);
        put_str(&mut out, &self.server);
        out.extend_from_slice(&self.started_at_ms.to_be_bytes());
        out.extend_from_slice(&self.finished_at_ms.to_be_bytes());
        out.push(u8::from(self.partial));
        if let Some(stage) = &self.stage {
            put_str(&mut out, &stage.sha256);
            for n in [
                stage.first_block,
                stage.last_block,
                stage.sequence,
                stage.rows,
                stage.passes,
            ] {
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
        out
    }

    /// Refuses a receipt whose strings do not fit the canonical encoding.
    fn check_encodable(&self) -> Result<(), ReceiptError> {
        let fields = [
            ("request_id", &self.request_id),
            ("model", &self.model),
            ("requester", &self.requester),
            ("server", &self.server),
        ];
        let sha = self.stage.as_ref().map(|s| ("stage.sha256", &s.sha256));
        for (name, value) in fields.into_iter().chain(sha) {
            if u32::try_from(value.len()).is_err() {
                return Err(ReceiptError::FieldTooLong(name));
            }
        }
        Ok(())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A receipt with the server's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReceipt {
    /// What the server states.
    pub receipt: Receipt,
    /// Standard base64 of the 64-byte ed25519 signature over [`Receipt::canonical_bytes`].
    pub signature: String,
}

impl SignedReceipt {
    /// Signs `receipt` with the server's node key, which must be the ed25519 key of the PeerId in
    /// `receipt.server`.
    pub fn sign(receipt: Receipt, key: &Keypair) -> Result<SignedReceipt, ReceiptError> {
        receipt.check_encodable()?;
        let signer = key.public().to_peer_id().to_string();
        if receipt.server != signer {
            return Err(ReceiptError::ServerMismatch {
                server: receipt.server,
                signer,
            });
        }
        let ed = key
            .clone()
            .try_into_ed25519()
            .map_err(|e| ReceiptError::UnsupportedKeyType(e.to_string()))?;
        let secret = ed.secret();
        let secret: &[u8; 32] = secret.as_ref().try_into().map_err(|_| {
            ReceiptError::UnsupportedKeyType("ed25519 secret key is not 32 bytes".into())
        })?;
        let signing = SigningKey::from_bytes(secret);
        let signature = signing.sign(&receipt.canonical_bytes());
        Ok(SignedReceipt {
            receipt,
            signature: B64.encode(signature.to_bytes()),
        })
    }

    /// Checks the signature against the key embedded in the `server` PeerId.
    pub fn verify(&self) -> Result<(), ReceiptError> {
        self.receipt.check_encodable()?;
        let raw = B64
            .decode(self.signature.as_bytes())
            .map_err(|e| ReceiptError::BadSignatureEncoding(e.to_string()))?;
        let signature = Signature::from_slice(&raw).map_err(|_| {
            ReceiptError::BadSignatureEncoding(format!("{} bytes, expected 64", raw.len()))
        })?;
        let key = server_key(&self.receipt.server)?;
        key.verify_strict(&self.receipt.canonical_bytes(), &signature)
            .map_err(|_| ReceiptError::BadSignature {
                server: self.receipt.server.clone(),
            })
    }
}

/// The ed25519 public key a PeerId inlines.
fn server_key(server: &str) -> Result<VerifyingKey, ReceiptError> {
    let bad = |reason: String| ReceiptError::BadPeerId {
        peer: server.to_owned(),
        reason,
    };
    let peer = PeerId::from_str(server).map_err(|e| bad(e.to_string()))?;
    let multihash = peer.as_ref();
    if multihash.code() != IDENTITY_MULTIHASH {
        // Only keys too long to inline (RSA) are hashed, and those are not ed25519.
        return Err(ReceiptError::UnsupportedKeyType(format!(
            "{server} does not embed its public key (multihash code {:#x})",
            multihash.code()
        )));
    }
    let encoded = multihash.digest();
    // This build of libp2p decodes ed25519 keys only; tell other key types apart from garbage by
    // the leading `Type` field of the protobuf (tag 0x08; 1 is Ed25519).
    if let [0x08, kind, ..] = encoded {
        if *kind != ED25519_KEY_TYPE {
            return Err(ReceiptError::UnsupportedKeyType(format!(
                "{server} has a key of protobuf type {kind}, not ed25519"
            )));
        }
    }
    let public = PublicKey::try_decode_protobuf(encoded).map_err(|e| bad(e.to_string()))?;
    let ed = public
        .try_into_ed25519()
        .map_err(|e| ReceiptError::UnsupportedKeyType(format!("{server}: {e}")))?;
    VerifyingKey::from_bytes(&ed.to_bytes()).map_err(|e| bad(e.to_string()))
}

/// Which side of a request this pod was on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// This pod served the request; the counterpart is the requester.
    Served,
    /// This pod asked; the counterpart is the server.
    Consumed,
}

/// One ledger record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Which side this pod was on.
    pub role: Role,
    /// When the record was appended, unix milliseconds.
    pub at_ms: u64,
    /// The receipt and its signature.
    #[serde(flatten)]
    pub signed: SignedReceipt,
}

/// What reading a ledger found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LedgerRead {
    /// Records whose signature verifies, in file order.
    pub entries: Vec<LedgerEntry>,
    /// Lines that are not a record, such as the fragment a crash left mid-write; skipped.
    pub torn: usize,
    /// Records whose signature does not verify; skipped.
    pub invalid: usize,
}

/// Work counted in one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Requests, partial ones included.
    pub requests: u64,
    /// Input tokens processed.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
}

impl Totals {
    fn add(&mut self, receipt: &Receipt) {
        self.requests = self.requests.saturating_add(1);
        self.prompt_tokens = self.prompt_tokens.saturating_add(receipt.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(receipt.completion_tokens);
    }
}

/// The work exchanged with one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerSummary {
    /// The counterpart's PeerId.
    pub peer: String,
    /// Work this pod did for the peer.
    pub served: Totals,
    /// Work the peer did for this pod.
    pub consumed: Totals,
}

/// How many records a ledger holds, and what it skipped, as counted by [`Ledger::counts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LedgerCounts {
    /// Records whose signature verifies.
    pub records: usize,
    /// Lines that are not a record; skipped.
    pub torn: usize,
    /// Records whose signature does not verify; skipped.
    pub invalid: usize,
}

/// Requests whose last receipt a [`Tally`] remembers, so that a later receipt for one of them
/// (a final one after a progress one) replaces the earlier instead of counting twice. Receipts
/// of one request are appended moments apart, so a window keeps the memory bounded.
const RECENT_REQUESTS: usize = 4096;

/// Which request a receipt is for, on which side.
type RequestKey = (Role, String, String);

/// The running per-peer totals of a ledger, updated as records are appended and rebuilt from
/// the file at open, so that reading them never reads the file.
#[derive(Debug, Default)]
struct Tally {
    peers: BTreeMap<String, PeerSummary>,
    recent: HashMap<RequestKey, (u64, u64)>,
    order: VecDeque<RequestKey>,
    counts: LedgerCounts,
}

impl Tally {
    /// Counts one line of the ledger file.
    fn line(&mut self, line: &[u8]) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        match serde_json::from_slice::<LedgerEntry>(line) {
            Err(_) => self.counts.torn += 1,
            Ok(entry) if entry.signed.verify().is_ok() => {
                self.add(entry.role, &entry.signed.receipt)
            }
            Ok(_) => self.counts.invalid += 1,
        }
    }

    /// Counts a verified record.
    fn add(&mut self, role: Role, receipt: &Receipt) {
        self.counts.records += 1;
        let peer = match role {
            Role::Served => &receipt.requester,
            Role::Consumed => &receipt.server,
        };
        let summary = self
            .peers
            .entry(peer.clone())
            .or_insert_with(|| PeerSummary {
                peer: peer.clone(),
                served: Totals::default(),
                consumed: Totals::default(),
            });
        let totals = match role {
            Role::Served => &mut summary.served,
            Role::Consumed => &mut summary.consumed,
        };
        let key = (role, receipt.server.clone(), receipt.request_id.clone());
        let tokens = (receipt.prompt_tokens, receipt.completion_tokens);
        if let Some(earlier) = self.recent.insert(key.clone(), tokens) {
            totals.prompt_tokens = totals.prompt_tokens.saturating_sub(earlier.0);
            totals.completion_tokens = totals.completion_tokens.saturating_sub(earlier.1);
            totals.requests = totals.requests.saturating_sub(1);
        } else {
            self.order.push_back(key);
            if self.order.len() > RECENT_REQUESTS {
                if let Some(old) = self.order.pop_front() {
                    self.recent.remove(&old);
                }
            }
        }
        totals.add(receipt);
    }
}

/// This pod's append-only receipt ledger. Cheap to share behind an `Arc`; appends from several
/// threads never interleave.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    file: Mutex<File>,
    tally: Mutex<Tally>,
}

impl Ledger {
    /// Opens (creating it if needed) the ledger under `home`, ending a line a crash left torn.
    pub fn open(home: &Path) -> Result<Ledger, ReceiptError> {
        let dir = home.join(RECEIPTS_DIR);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join(LEDGER_FILE);
        let mut options = OpenOptions::new();
        options.read(true).append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&path).map_err(io_err(&path))?;
        // A newly created file's directory entry must survive a crash too.
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        if ends_torn(&mut file).map_err(io_err(&path))? {
            file.write_all(b"\n")
                .and_then(|()| file.sync_data())
                .map_err(io_err(&path))?;
            tracing::warn!(path = %path.display(), "receipt ledger ended in a torn record; it will be skipped");
        }
        let tally = tally_file(&path).map_err(io_err(&path))?;
        Ok(Ledger {
            path,
            file: Mutex::new(file),
            tally: Mutex::new(tally),
        })
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `receipt` durably. Refuses a receipt whose signature does not verify, so that the
    /// ledger only ever holds checked work.
    pub fn append(&self, role: Role, receipt: &SignedReceipt) -> Result<(), ReceiptError> {
        receipt.verify()?;
        let entry = LedgerEntry {
            role,
            at_ms: now_ms(),
            signed: receipt.clone(),
        };
        let mut line = serde_json::to_vec(&entry).map_err(ReceiptError::Encode)?;
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        // A write that failed part way (a full disk, say) left the end of a record without
        // its newline: end that line first, or this record would be glued to it and lost.
        if ends_torn(&mut file).map_err(io_err(&self.path))? {
            line.insert(0, b'\n');
            self.tally
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .counts
                .torn += 1;
        }
        file.write_all(&line)
            .and_then(|()| file.sync_data())
            .map_err(io_err(&self.path))?;
        self.tally
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add(role, &receipt.receipt);
        Ok(())
    }

    /// How many records the ledger holds and skipped, kept as records are appended: reading
    /// them costs nothing however large the ledger.
    pub fn counts(&self) -> LedgerCounts {
        self.tally
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .counts
    }

    /// [`Ledger::append`] on the blocking pool: the write and `fdatasync` would otherwise hold
    /// an async runtime thread (and every task queued on it) for as long as the disk takes.
    pub async fn append_off_runtime(
        self: std::sync::Arc<Self>,
        role: Role,
        receipt: SignedReceipt,
    ) -> Result<(), ReceiptError> {
        tokio::task::spawn_blocking(move || self.append(role, &receipt))
            .await
            .map_err(|e| ReceiptError::WriteCancelled(e.to_string()))?
    }

    /// Reads every record, skipping (and counting) torn lines and records that do not verify.
    pub fn entries(&self) -> Result<LedgerRead, ReceiptError> {
        let bytes = {
            // Holding the append lock gives a snapshot without a half-written last record.
            let _appends = self.file.lock().unwrap_or_else(PoisonError::into_inner);
            fs::read(&self.path).map_err(io_err(&self.path))?
        };
        let mut read = LedgerRead::default();
        for line in bytes.split(|&b| b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            // A record that is complete but lacks only its newline parses, and is kept.
            let Ok(entry) = serde_json::from_slice::<LedgerEntry>(line) else {
                read.torn += 1;
                continue;
            };
            if entry.signed.verify().is_ok() {
                read.entries.push(entry);
            } else {
                read.invalid += 1;
            }
        }
        Ok(read)
    }

    /// Work exchanged per counterpart peer, sorted by PeerId, kept as records are appended:
    /// reading it costs nothing however large the ledger.
    ///
    /// A request is counted once per role and server: when several receipts share a
    /// `request_id` (progress receipts followed by a final one), the last one appended counts,
    /// among the last few thousand requests.
    pub fn summary(&self) -> Result<Vec<PeerSummary>, ReceiptError> {
        let tally = self.tally.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(tally.peers.values().cloned().collect())
    }

    /// One page of [`Ledger::summary`]: at most `limit` peers whose PeerId sorts after
    /// `after` (from the first when `None`), and whether more follow. Costs the page, not the
    /// number of peers.
    pub fn summary_page(&self, after: Option<&str>, limit: usize) -> (Vec<PeerSummary>, bool) {
        use std::ops::Bound;
        let tally = self.tally.lock().unwrap_or_else(PoisonError::into_inner);
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut rows = tally.peers.range::<str, _>((start, Bound::Unbounded));
        let page = rows.by_ref().take(limit).map(|(_, p)| p.clone()).collect();
        (page, rows.next().is_some())
    }
}

/// Tallies a ledger file, one line at a time.
fn tally_file(path: &Path) -> std::io::Result<Tally> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut tally = Tally::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(tally);
        }
        tally.line(&line);
    }
}

/// Whether the file is non-empty and does not end in a newline.
fn ends_torn(file: &mut File) -> std::io::Result<bool> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(false);
    }
    file.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

/// Now, in unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn receipt_for(server: &Keypair, requester: &str, request_id: &str, tokens: u64) -> Receipt {
        Receipt {
            request_id: request_id.into(),
            model: "qwen3-0.6b".into(),
            prompt_tokens: tokens,
            completion_tokens: 2 * tokens,
            requester: requester.into(),
            server: server.public().to_peer_id().to_string(),
            started_at_ms: 1_700_000_000_000,
            finished_at_ms: 1_700_000_001_500,
            partial: false,
            stage: None,
        }
    }

    fn peer() -> String {
        Keypair::generate_ed25519()
            .public()
            .to_peer_id()
            .to_string()
    }

    #[test]
    fn sign_then_verify_round_trips() -> TestResult {
        let key = Keypair::generate_ed25519();
        let signed = SignedReceipt::sign(receipt_for(&key, &peer(), "r1", 10), &key)?;
        signed.verify()?;
        // The signature is a plain ed25519 one, so libp2p's own verifier accepts it too.
        let sig = B64.decode(&signed.signature)?;
        assert!(key.public().verify(&signed.receipt.canonical_bytes(), &sig));
        // And it survives a trip through JSON.
        let back: SignedReceipt = serde_json::from_str(&serde_json::to_string(&signed)?)?;
        back.verify()?;
        Ok(())
    }

    #[test]
    fn tampering_with_any_field_breaks_the_signature() -> TestResult {
        let key = Keypair::generate_ed25519();
        let signed = SignedReceipt::sign(receipt_for(&key, &peer(), "r1", 10), &key)?;
        let tampers: Vec<fn(&mut Receipt)> = vec![
            |r| r.request_id.push('x'),
            |r| r.model = "llama-70b".into(),
            |r| r.prompt_tokens += 1,
            |r| r.completion_tokens *= 10,
            |r| r.requester = "someone-else".into(),
            |r| r.started_at_ms -= 1,
            |r| r.finished_at_ms += 1,
            |r| r.partial = true,
        ];
        for tamper in tampers {
            let mut forged = signed.clone();
            tamper(&mut forged.receipt);
            assert!(matches!(
                forged.verify(),
                Err(ReceiptError::BadSignature { .. })
            ));
        }
        // Claiming another server checks the signature against that server's key.
        let mut forged = signed.clone();
        forged.receipt.server = peer();
        assert!(matches!(
            forged.verify(),
            Err(ReceiptError::BadSignature { .. })
        ));
        Ok(())
    }

    #[test]
    fn another_keys_signature_is_rejected() -> TestResult {
        let server = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let genuine = receipt_for(&server, &peer(), "r1", 10);
        let mut by_other = genuine.clone();
        by_other.server = other.public().to_peer_id().to_string();
        let forged = SignedReceipt {
            receipt: genuine,
            signature: SignedReceipt::sign(by_other, &other)?.signature,
        };
        assert!(matches!(
            forged.verify(),
            Err(ReceiptError::BadSignature { .. })
        ));
        Ok(())
    }

    #[test]
    fn signing_for_another_server_is_refused() {
        let key = Keypair::generate_ed25519();
        let mut receipt = receipt_for(&key, &peer(), "r1", 10);
        receipt.server = peer();
        assert!(matches!(
            SignedReceipt::sign(receipt, &key),
            Err(ReceiptError::ServerMismatch { .. })
        ));
    }

    #[test]
    fn canonical_bytes_follow_the_documented_format() {
        let receipt = Receipt {
            request_id: "r1".into(),
            model: "m".into(),
            prompt_tokens: 1,
            completion_tokens: 258,
            requester: "a".into(),
            server: "bc".into(),
            started_at_ms: 3,
            finished_at_ms: 4,
            partial: true,
            stage: None,
        };
        let mut expected: Vec<u8> = b"pod-receipt/1\0".to_vec();
        expected.extend_from_slice(&[0, 0, 0, 2, b'r', b'1']);
        expected.extend_from_slice(&[0, 0, 0, 1, b'm']);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 2]);
        expected.extend_from_slice(&[0, 0, 0, 1, b'a']);
        expected.extend_from_slice(&[0, 0, 0, 2, b'b', b'c']);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 3]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 4]);
        expected.push(1);
        assert_eq!(receipt.canonical_bytes(), expected);
        assert_eq!(
            receipt.canonical_bytes().len(),
            14 + 6 + 5 + 16 + 5 + 6 + 16 + 1
        );
    }

    /// A vector computed independently (Python `cryptography`, hand-built PeerId and canonical
    /// bytes from the module docs), so that a change to the encoding or the key handling fails.
    #[test]
    fn known_answer_vector_matches_an_independent_implementation() -> TestResult {
        let secret = libp2p::identity::ed25519::SecretKey::try_from_bytes([7u8; 32])?;
        let key = Keypair::from(libp2p::identity::ed25519::Keypair::from(secret));
        let server = "12D3KooWRawPbxPtP1eZaJpumGnyWX2DcUyd3RQnydr3eAto4Az7";
        assert_eq!(key.public().to_peer_id().to_string(), server);
        let receipt = Receipt {
            request_id: "req-1".into(),
            model: "qwen3-0.6b".into(),
            prompt_tokens: 12,
            completion_tokens: 34,
            requester: "requester".into(),
            server: server.into(),
            started_at_ms: 1000,
            finished_at_ms: 2500,
            partial: false,
            stage: None,
        };
        let signed = SignedReceipt::sign(receipt, &key)?;
        assert_eq!(
            signed.signature,
            "8UadhMsFTQqquUivP1m/O5Aag4fwh3pNaGt+meYw582srcK03aGQkvRfn3ZluspXr0JrWg9vLuVvKVcCmMz6Ag=="
        );
        signed.verify()?;
        Ok(())
    }

    #[test]
    fn a_stage_receipt_signs_its_work_and_a_change_to_any_of_it_fails() -> TestResult {
        let key = Keypair::generate_ed25519();
        let mut receipt = receipt_for(&key, &peer(), "stage-7", 40);
        receipt.completion_tokens = 0;
        receipt.stage = Some(StageWork {
            sha256: "ab".repeat(32),
            first_block: 15,
            last_block: 29,
            sequence: 7,
            rows: 40,
            passes: 17,
        });
        let bytes = receipt.canonical_bytes();
        assert!(bytes.starts_with(CANONICAL_PREFIX_STAGE));
        let mut v1 = receipt.clone();
        v1.stage = None;
        assert!(v1.canonical_bytes().starts_with(CANONICAL_PREFIX));
        assert_eq!(bytes.len(), v1.canonical_bytes().len() + 4 + 64 + 5 * 8);

        let signed = SignedReceipt::sign(receipt, &key)?;
        signed.verify()?;
        // Through JSON, as it travels and as the ledger keeps it.
        let back: SignedReceipt = serde_json::from_str(&serde_json::to_string(&signed)?)?;
        back.verify()?;
        type Tamper = fn(&mut StageWork);
        let tampers: [Tamper; 6] = [
            |s| s.sha256.replace_range(0..1, "c"),
            |s| s.first_block = 0,
            |s| s.last_block += 1,
            |s| s.sequence += 1,
            |s| s.rows += 1,
            |s| s.passes -= 1,
        ];
        for tamper in tampers {
            let mut forged = signed.clone();
            if let Some(stage) = forged.receipt.stage.as_mut() {
                tamper(stage);
            }
            assert!(matches!(
                forged.verify(),
                Err(ReceiptError::BadSignature { .. })
            ));
        }
        // Dropping the stage's part does not turn it into a valid whole-request receipt.
        let mut stripped = signed;
        stripped.receipt.stage = None;
        assert!(stripped.verify().is_err());
        Ok(())
    }

    #[test]
    fn malformed_inputs_get_distinct_errors() -> TestResult {
        let key = Keypair::generate_ed25519();
        let signed = SignedReceipt::sign(receipt_for(&key, &peer(), "r1", 10), &key)?;

        let mut bad = signed.clone();
        bad.signature = "not base64!".into();
        assert!(matches!(
            bad.verify(),
            Err(ReceiptError::BadSignatureEncoding(_))
        ));

        let mut short = signed.clone();
        short.signature = B64.encode([0u8; 63]);
        assert!(matches!(
            short.verify(),
            Err(ReceiptError::BadSignatureEncoding(_))
        ));

        let mut bad_peer = signed.clone();
        bad_peer.receipt.server = "not-a-peer-id".into();
        assert!(matches!(
            bad_peer.verify(),
            Err(ReceiptError::BadPeerId { .. })
        ));

        // A secp256k1 PeerId inlines its (33-byte compressed) key too, but it is not ed25519.
        let mut secp = vec![0x00, 37, 0x08, 0x02, 0x12, 33, 0x02];
        secp.extend_from_slice(&[0x11; 32]);
        let mut other_type = signed.clone();
        other_type.receipt.server = PeerId::from_bytes(&secp)?.to_string();
        assert!(matches!(
            other_type.verify(),
            Err(ReceiptError::UnsupportedKeyType(_))
        ));
        // An RSA PeerId only hashes its key (sha2-256 multihash), so there is nothing to check.
        let mut rsa = vec![0x12, 32];
        rsa.extend_from_slice(&[0x22; 32]);
        let mut hashed = signed.clone();
        hashed.receipt.server = PeerId::from_bytes(&rsa)?.to_string();
        assert!(matches!(
            hashed.verify(),
            Err(ReceiptError::UnsupportedKeyType(_))
        ));
        Ok(())
    }

    #[test]
    fn ledger_survives_reopen() -> TestResult {
        let home = tempfile::tempdir()?;
        let key = Keypair::generate_ed25519();
        let requester = peer();
        let a = SignedReceipt::sign(receipt_for(&key, &requester, "r1", 10), &key)?;
        let b = SignedReceipt::sign(receipt_for(&key, &requester, "r2", 20), &key)?;
        {
            let ledger = Ledger::open(home.path())?;
            ledger.append(Role::Served, &a)?;
            ledger.append(Role::Consumed, &b)?;
        }
        let ledger = Ledger::open(home.path())?;
        assert_eq!(
            ledger.path(),
            home.path().join("receipts").join("ledger.jsonl")
        );
        let read = ledger.entries()?;
        assert_eq!((read.torn, read.invalid), (0, 0));
        let got: Vec<_> = read.entries.iter().map(|e| (e.role, &e.signed)).collect();
        assert_eq!(got, vec![(Role::Served, &a), (Role::Consumed, &b)]);

        let text = fs::read_to_string(ledger.path())?;
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap_or(""))?;
        assert_eq!(first["role"], "served");
        assert!(first["at_ms"].is_u64());
        assert_eq!(first["receipt"]["request_id"], "r1");
        assert_eq!(first["signature"], a.signature.as_str());

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(ledger.path())?.permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        Ok(())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn appends_on_the_blocking_pool_keep_their_order_and_checks() -> TestResult {
        let home = tempfile::tempdir()?;
        let key = Keypair::generate_ed25519();
        let ledger = std::sync::Arc::new(Ledger::open(home.path())?);
        let mut sent = Vec::new();
        for (i, id) in ["r1", "r2", "r3"].into_iter().enumerate() {
            let signed = SignedReceipt::sign(receipt_for(&key, &peer(), id, i as u64), &key)?;
            std::sync::Arc::clone(&ledger)
                .append_off_runtime(Role::Served, signed.clone())
                .await?;
            sent.push(signed);
        }
        let mut forged = sent[0].clone();
        forged.receipt.completion_tokens += 1;
        assert!(std::sync::Arc::clone(&ledger)
            .append_off_runtime(Role::Served, forged)
            .await
            .is_err());
        let read = ledger.entries()?;
        let got: Vec<_> = read.entries.iter().map(|e| &e.signed).collect();
        assert_eq!(got, sent.iter().collect::<Vec<_>>());
        Ok(())
    }

    #[test]
    fn append_refuses_an_unverified_receipt() -> TestResult {
        let home = tempfile::tempdir()?;
        let key = Keypair::generate_ed25519();
        let mut signed = SignedReceipt::sign(receipt_for(&key, &peer(), "r1", 10), &key)?;
        signed.receipt.completion_tokens += 1;
        let ledger = Ledger::open(home.path())?;
        assert!(ledger.append(Role::Consumed, &signed).is_err());
        assert!(ledger.entries()?.entries.is_empty());
        Ok(())
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_later_records_stay_readable() -> TestResult {
        let home = tempfile::tempdir()?;
        let key = Keypair::generate_ed25519();
        let requester = peer();
        let a = SignedReceipt::sign(receipt_for(&key, &requester, "r1", 10), &key)?;
        let b = SignedReceipt::sign(receipt_for(&key, &requester, "r2", 20), &key)?;
        let path = {
            let ledger = Ledger::open(home.path())?;
            ledger.append(Role::Served, &a)?;
            ledger.path().to_owned()
        };
        // A crash mid-write: half of a record, no newline.
        let whole = serde_json::to_string(&LedgerEntry {
            role: Role::Served,
            at_ms: 1,
            signed: b.clone(),
        })?;
        let mut file = OpenOptions::new().append(true).open(&path)?;
        file.write_all(&whole.as_bytes()[..whole.len() / 2])?;
        drop(file);

        let ledger = Ledger::open(home.path())?;
        let read = ledger.entries()?;
        assert_eq!((read.entries.len(), read.torn), (1, 1));
        ledger.append(Role::Served, &b)?;
        let read = ledger.entries()?;
        assert_eq!((read.torn, read.invalid), (1, 0));
        let got: Vec<_> = read.entries.iter().map(|e| &e.signed).collect();
        assert_eq!(got, vec![&a, &b]);
        Ok(())
    }

    #[test]
    fn a_record_with_a_bad_signature_is_counted_invalid() -> TestResult {
        let home = tempfile::tempdir()?;
        let key = Keypair::generate_ed25519();
        let good = SignedReceipt::sign(receipt_for(&key, &peer(), "r1", 10), &key)?;
        let mut forged = good.clone();
        forged.receipt.completion_tokens = 1_000_000;
        let ledger = Ledger::open(home.path())?;
        ledger.append(Role::Served, &good)?;
        let mut line = serde_json::to_vec(&LedgerEntry {
            role: Role::Served,
            at_ms: 2,
            signed: forged,
        })?;
        line.push(b'\n');
        OpenOptions::new()
            .append(true)
            .open(ledger.path())?
            .write_all(&line)?;
        let read = ledger.entries()?;
        assert_eq!((read.entries.len(), read.torn, read.invalid), (1, 0, 1));
        assert_eq!(read.entries[0].signed, good);
        Ok(())
    }

    #[test]
    fn summary_totals_each_peer_in_both_directions() -> TestResult {
        let home = tempfile::tempdir()?;
        let me = Keypair::generate_ed25519();
        let me_id = me.public().to_peer_id().to_string();
        let alice = Keypair::generate_ed25519();
        let alice_id = alice.public().to_peer_id().to_string();
        let bob_id = peer();
        let ledger = Ledger::open(home.path())?;

        // Served alice twice (a1 first as a progress receipt, then finished) and bob once;
        // alice served us once.
        let mut progress = receipt_for(&me, &alice_id, "a1", 5);
        progress.partial = true;
        ledger.append(Role::Served, &SignedReceipt::sign(progress, &me)?)?;
        for (requester, id, tokens) in [
            (&alice_id, "a1", 10),
            (&alice_id, "a2", 1),
            (&bob_id, "b1", 7),
        ] {
            let signed = SignedReceipt::sign(receipt_for(&me, requester, id, tokens), &me)?;
            ledger.append(Role::Served, &signed)?;
        }
        let from_alice = SignedReceipt::sign(receipt_for(&alice, &me_id, "m1", 100), &alice)?;
        ledger.append(Role::Consumed, &from_alice)?;

        let mut expected = vec![
            PeerSummary {
                peer: alice_id,
                served: Totals {
                    requests: 2,
                    prompt_tokens: 11,
                    completion_tokens: 22,
                },
                consumed: Totals {
                    requests: 1,
                    prompt_tokens: 100,
                    completion_tokens: 200,
                },
            },
            PeerSummary {
                peer: bob_id,
                served: Totals {
                    requests: 1,
                    prompt_tokens: 7,
                    completion_tokens: 14,
                },
                consumed: Totals::default(),
            },
        ];
        expected.sort_by(|a, b| a.peer.cmp(&b.peer));
        assert_eq!(ledger.summary()?, expected);
        Ok(())
    }

    #[test]
    fn summaries_and_counts_are_rebuilt_at_open_as_a_full_read_finds_them() -> TestResult {
        let home = tempfile::tempdir()?;
        let me = Keypair::generate_ed25519();
        let requester = peer();
        let ledger = Ledger::open(home.path())?;
        let mut progress = receipt_for(&me, &requester, "a1", 5);
        progress.partial = true;
        ledger.append(Role::Served, &SignedReceipt::sign(progress, &me)?)?;
        for (id, tokens) in [("a1", 10), ("a2", 1)] {
            let signed = SignedReceipt::sign(receipt_for(&me, &requester, id, tokens), &me)?;
            ledger.append(Role::Served, &signed)?;
        }
        let before = ledger.summary()?;
        assert_eq!(before.len(), 1);
        assert_eq!(before[0].served.requests, 2);
        assert_eq!(before[0].served.completion_tokens, 22);
        assert_eq!(
            ledger.counts(),
            LedgerCounts {
                records: 3,
                torn: 0,
                invalid: 0
            }
        );
        let path = ledger.path().to_owned();
        drop(ledger);
        // A forged record and a torn one, as a crash or a hand edit leaves them.
        let mut forged = SignedReceipt::sign(receipt_for(&me, &requester, "f", 1), &me)?;
        forged.receipt.completion_tokens = 1000;
        let forged = serde_json::to_string(&LedgerEntry {
            role: Role::Served,
            at_ms: 1,
            signed: forged,
        })?;
        let mut file = OpenOptions::new().append(true).open(&path)?;
        file.write_all(format!("{forged}\n{{\"role\":").as_bytes())?;
        drop(file);

        let ledger = Ledger::open(home.path())?;
        assert_eq!(ledger.summary()?, before);
        let counts = ledger.counts();
        let read = ledger.entries()?;
        assert_eq!(
            (counts.records, counts.torn, counts.invalid),
            (read.entries.len(), read.torn, read.invalid)
        );
        assert_eq!((counts.records, counts.torn, counts.invalid), (3, 1, 1));
        Ok(())
    }

    #[test]
    fn summaries_come_in_pages_in_peer_order() -> TestResult {
        let home = tempfile::tempdir()?;
        let ledger = Ledger::open(home.path())?;
        let me = Keypair::generate_ed25519();
        let mut requesters: Vec<String> = (0..7).map(|_| peer()).collect();
        for (i, requester) in requesters.iter().enumerate() {
            let id = format!("r{i}");
            let signed = SignedReceipt::sign(receipt_for(&me, requester, &id, 3), &me)?;
            ledger.append(Role::Served, &signed)?;
        }
        requesters.sort();
        let (first, more) = ledger.summary_page(None, 3);
        assert!(more);
        let peers = |rows: &[PeerSummary]| rows.iter().map(|r| r.peer.clone()).collect::<Vec<_>>();
        assert_eq!(peers(&first), requesters[..3]);
        let (second, more) = ledger.summary_page(Some(&requesters[2]), 3);
        assert!(more);
        assert_eq!(peers(&second), requesters[3..6]);
        let (last, more) = ledger.summary_page(Some(&requesters[5]), 3);
        assert!(!more);
        assert_eq!(peers(&last), requesters[6..]);
        let (all, more) = ledger.summary_page(None, 100);
        assert!(!more);
        assert_eq!(all, ledger.summary()?);
        Ok(())
    }

    #[test]
    fn an_append_after_a_torn_write_starts_a_new_line() -> TestResult {
        let home = tempfile::tempdir()?;
        let ledger = Ledger::open(home.path())?;
        let me = Keypair::generate_ed25519();
        let requester = peer();
        let signed = |id: &str| SignedReceipt::sign(receipt_for(&me, &requester, id, 2), &me);
        ledger.append(Role::Served, &signed("a")?)?;
        // What a write that failed part way leaves at the end of the file.
        let mut file = OpenOptions::new().append(true).open(ledger.path())?;
        file.write_all(b"{\"role\":\"served\",\"at_")?;
        drop(file);
        ledger.append(Role::Served, &signed("b")?)?;
        assert_eq!(ledger.counts().records, 2);
        assert_eq!(ledger.counts().torn, 1);

        drop(ledger);
        let ledger = Ledger::open(home.path())?;
        let read = ledger.entries()?;
        assert_eq!(
            read.entries.len(),
            2,
            "the record after the torn one survives"
        );
        assert_eq!(read.torn, 1);
        assert_eq!(ledger.counts().records, 2);
        Ok(())
    }

    #[test]
    fn concurrent_appends_never_interleave() -> TestResult {
        let home = tempfile::tempdir()?;
        let ledger = Arc::new(Ledger::open(home.path())?);
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let ledger = Arc::clone(&ledger);
                std::thread::spawn(move || -> Result<(), ReceiptError> {
                    let key = Keypair::generate_ed25519();
                    for i in 0..25 {
                        let receipt = receipt_for(&key, "requester", &format!("{t}-{i}"), i);
                        ledger.append(Role::Served, &SignedReceipt::sign(receipt, &key)?)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle.join().map_err(|_| "append thread panicked")??;
        }
        let read = ledger.entries()?;
        assert_eq!((read.entries.len(), read.torn, read.invalid), (100, 0, 0));
        Ok(())
    }
}
