//! [`Engine`]: the engine thread and its loop. It owns every loaded model, the queue of waiting
//! requests, the running sequences and the prefix cache; each turn of the loop takes the
//! commands that arrived, admits waiting requests, and steps every running sequence once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;

use tokio::sync::mpsc;

use super::admission::Job;
use super::forward::{forward, guarded, select};
use super::handle::{Command, EngineHandle};
use super::pipeline::{Running, Step};
use super::prefix_cache::PrefixCache;
use super::scheduler::{self, Feed};
use super::types::{EmbedResponse, EngineConfig, EngineStats, GenerateEvent};
use crate::decoder::BatchDecoder;
use crate::embedding::EmbeddingModel;
use crate::error::EngineError;
use crate::model::ChatModel;

/// The engine thread's state: every loaded model, waiting requests, running sequences and the
/// prefix cache. Started with [`Engine::start`]; callers talk to it through the
/// [`EngineHandle`] that returns. `D` is the kind of chat model it drives.
pub struct Engine<D: BatchDecoder = ChatModel> {
    commands: mpsc::UnboundedReceiver<Command<D>>,
    chat: HashMap<String, D>,
    embedding: HashMap<String, EmbeddingModel>,
    waiting: VecDeque<Box<Job>>,
    running: Vec<Running<D::Cache>>,
    prefixes: PrefixCache<D::Cache>,
    stats: Arc<EngineStats>,
    config: EngineConfig,
}

impl<D: BatchDecoder> std::fmt::Debug for Engine<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("waiting", &self.waiting.len())
            .field("running", &self.running.len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Engine<ChatModel> {
    /// Starts the engine thread with no models; add them with
    /// [`EngineHandle::add_chat_model`] and [`EngineHandle::add_embedding_model`]. The thread
    /// ends when every handle is dropped.
    pub fn start(config: EngineConfig) -> EngineHandle {
        Self::start_with(config)
    }
}

impl<D: BatchDecoder> Engine<D> {
    /// Starts an engine thread driving chat models of type `D`, added with
    /// [`EngineHandle::add_decoder`].
    pub fn start_with(config: EngineConfig) -> EngineHandle<D> {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(EngineStats::default());
        let engine = Engine {
            commands: rx,
            chat: HashMap::new(),
            embedding: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            prefixes: PrefixCache::default(),
            stats: Arc::clone(&stats),
            config: config.clone(),
        };
        let spawned = thread::Builder::new()
            .name("pod-engine".into())
            .spawn(move || engine.run());
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the engine thread");
        }
        EngineHandle::new(tx, stats, config)
    }

    fn run(mut self) {
        let mut open = true;
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                if !open {
                    break;
                }
                match self.commands.blocking_recv() {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                }
            }
            loop {
                match self.commands.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.admit();
            self.step_all();
        }
        tracing::debug!("engine thread stopped");
    }

    fn handle(&mut self, cmd: Command<D>) {
        match cmd {
            Command::Generate(job) => self.waiting.push_back(job),
            Command::Embed(req, reply) => {
                let result = match self.embedding.get(&req.model) {
                    Some(m) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        m.embed(&req.input)
                    }))
                    .unwrap_or_else(|_| Err("embedding model code panicked".into()))
                    .map(|data| EmbedResponse {
                        prompt_tokens: data.iter().map(|e| e.tokens).sum(),
                        data,
                    })
                    .map_err(EngineError::Internal),
                    None => Err(EngineError::UnknownModel(req.model)),
                };
                let _ = reply.send(result);
            }
            Command::AddChat(name, model) => {
                self.chat.insert(name, *model);
            }
            Command::AddEmbedding(name, model) => {
                self.embedding.insert(name, *model);
            }
        }
    }

    /// Starts waiting requests, oldest first, while slots are free; a cached prefix of their
    /// context stands in for feeding it.
    fn admit(&mut self) {
        while scheduler::admissions(
            self.running.len(),
            self.waiting.len(),
            self.config.max_active,
        ) > 0
        {
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Some(model) = self.chat.get(&job.model) else {
                let _ = job
                    .events
                    .send(GenerateEvent::Error(EngineError::UnknownModel(
                        job.model.clone(),
                    )));
                continue;
            };
            let (cache, fed) = match self.prefixes.lookup(&job.model, &job.context) {
                Some((cache, fed)) => {
                    self.stats
                        .cached_prompt_tokens
                        .fetch_add(fed as u64, Ordering::Relaxed);
                    tracing::debug!(tokens = fed, "prompt prefix reused from the cache");
                    (cache, fed)
                }
                None => (model.new_cache(), 0),
            };
            self.running.push(Running::new(job, cache, fed));
            self.stats.active.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One step of every running sequence: for each model, one forward pass over the rows the
    /// scheduler chose, then the token pipeline of each sequence.
    fn step_all(&mut self) {
        let mut done = vec![false; self.running.len()];
        for (r, d) in self.running.iter().zip(done.iter_mut()) {
            if r.job.events.is_closed() {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                *d = true;
            }
        }
        let models: Vec<String> = scheduler::models_in_order(
            self.running
                .iter()
                .zip(&done)
                .filter(|(_, d)| !**d)
                .map(|(r, _)| r.job.model.as_str()),
        )
        .into_iter()
        .map(str::to_owned)
        .collect();
        for name in models {
            match self.chat.get(&name) {
                Some(model) => step_model(
                    &name,
                    model,
                    &mut self.running,
                    &mut done,
                    &mut self.prefixes,
                    &self.stats,
                    &self.config,
                ),
                None => {
                    for (r, d) in self.running.iter().zip(done.iter_mut()) {
                        if r.job.model == name {
                            *d = true;
                        }
                    }
                }
            }
        }
        let mut i = self.running.len();
        while i > 0 {
            i -= 1;
            if done[i] {
                self.running.swap_remove(i);
                self.stats.active.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// One step of the sequences of `model` (named `name`) not `done` yet; marks those that end.
fn step_model<D: BatchDecoder>(
    name: &str,
    model: &D,
    running: &mut [Running<D::Cache>],
    done: &mut [bool],
    prefixes: &mut PrefixCache<D::Cache>,
    stats: &EngineStats,
    config: &EngineConfig,
) {
    let invariant = model.batch_invariant();
    let candidates: Vec<(usize, scheduler::Progress)> = running
        .iter()
        .enumerate()
        .filter(|(i, r)| !done[*i] && r.job.model == name)
        .map(|(i, r)| (i, r.progress()))
        .collect();
    let mut inputs: Vec<(usize, Vec<u32>)> = Vec::new();
    for (i, feed) in scheduler::plan_step(&candidates, invariant, config.prefill_chunk) {
        let r = &running[i];
        let is_sampled = feed == Feed::Sampled;
        match r.tokens(feed) {
            Ok(tokens) => inputs.push((i, tokens)),
            Err(e) => {
                debug_assert!(is_sampled, "the scheduler's ranges lie within the context");
                let _ = r.job.events.send(GenerateEvent::Error(e));
                done[i] = true;
            }
        }
    }
    let indices: Vec<usize> = inputs.iter().map(|(i, _)| *i).collect();
    let rows: Vec<&[u32]> = inputs.iter().map(|(_, t)| &t[..]).collect();
    let mut caches: Vec<&mut D::Cache> = select(running, &indices)
        .into_iter()
        .map(|r| &mut r.cache)
        .collect();
    let (results, passes) = forward(model, &mut caches, &rows);
    drop(caches);
    stats
        .forward_passes
        .fetch_add(passes as u64, Ordering::Relaxed);
    for ((i, tokens), result) in inputs.iter().zip(results) {
        let i = *i;
        let r = &mut running[i];
        let outcome = result.and_then(|logits| {
            r.history.extend_from_slice(tokens);
            guarded(|| r.advance(tokens.len(), logits, stats))
        });
        match outcome {
            Ok(Step::Continue) => {}
            Ok(Step::Finished) => {
                stats.completed.fetch_add(1, Ordering::Relaxed);
                done[i] = true;
                if invariant {
                    let history = std::mem::take(&mut r.history);
                    let cache = std::mem::replace(&mut r.cache, model.new_cache());
                    prefixes.store(name, history, cache, config.prefix_cache_bytes);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, model = %name, "generation failed");
                let _ = r.job.events.send(GenerateEvent::Error(e));
                done[i] = true;
            }
        }
    }
}
