//! [`Engine`]: the engine thread and its loop. It owns every loaded model, the queue of waiting
//! requests, the running sequences and the prefix cache; each turn of the loop takes the
//! commands that arrived, admits waiting requests, and steps every running sequence once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::admission::Job;
use super::forward::{forward, guarded, select};
use super::handle::{Command, EngineHandle};
use super::pipeline::{Running, Step};
use super::prefix_cache::PrefixCache;
use super::scheduler::{self, Feed};
use super::types::{
    EmbedRequest, EmbedResponse, EngineConfig, EngineStats, GenerateEvent, EVENT_QUEUE,
};
use crate::decoder::BatchDecoder;
use crate::embedding::{Embedding, EmbeddingModel, EMBED_BATCH};
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
    embeds: VecDeque<EmbedJob>,
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
            .field("embeds", &self.embeds.len())
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
            embeds: VecDeque::new(),
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
            if self.running.is_empty() && self.waiting.is_empty() && self.embeds.is_empty() {
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
            self.embed_step();
            self.step_all();
        }
        tracing::debug!("engine thread stopped");
    }

    fn handle(&mut self, cmd: Command<D>) {
        match cmd {
            Command::Generate(job) => self.waiting.push_back(job),
            Command::Embed(req, reply) => self.embeds.push_back(EmbedJob {
                data: Vec::with_capacity(req.input.len()),
                req,
                reply,
            }),
            Command::AddChat(name, model) => {
                self.chat.insert(name, *model);
            }
            Command::AddEmbedding(name, model) => {
                self.embedding.insert(name, *model);
            }
        }
    }

    /// Embeds the next batch of texts of the oldest embedding request, and answers it once
    /// every text is embedded: one batch per turn of the loop, so generations keep stepping
    /// during a long request. A request whose caller went away is dropped.
    fn embed_step(&mut self) {
        let Some(job) = self.embeds.front_mut() else {
            return;
        };
        let outcome = if job.reply.is_closed() {
            // Nobody reads the answer; the job only has to leave the queue.
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            Some(Err(EngineError::Stopped))
        } else {
            match self.embedding.get(&job.req.model) {
                None => Some(Err(EngineError::UnknownModel(job.req.model.clone()))),
                Some(model) => {
                    let start = job.data.len();
                    let end = (start + EMBED_BATCH).min(job.req.input.len());
                    let batch = &job.req.input[start..end];
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        model.embed_batch(batch)
                    }))
                    .unwrap_or_else(|_| Err("embedding model code panicked".into()));
                    match result {
                        Ok(vectors) => {
                            job.data.extend(vectors);
                            (job.data.len() >= job.req.input.len()).then(|| {
                                let data = std::mem::take(&mut job.data);
                                Ok(EmbedResponse {
                                    prompt_tokens: data.iter().map(|e| e.tokens).sum(),
                                    data,
                                })
                            })
                        }
                        Err(e) => Some(Err(EngineError::Internal(e))),
                    }
                }
            }
        };
        let Some(outcome) = outcome else {
            return;
        };
        if let Some(job) = self.embeds.pop_front() {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            let _ = job.reply.send(outcome);
        }
    }

    /// Starts waiting requests, oldest first, while slots are free and the KV memory budget
    /// has room for what each may come to hold; a cached prefix of their context stands in
    /// for feeding it. The oldest request that does not fit yet waits, and those behind it
    /// with it, until running sequences finish.
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
            let Some(per_token) = self.chat.get(&job.model).map(D::kv_bytes_per_token) else {
                let _ = job
                    .events
                    .try_send(GenerateEvent::Error(EngineError::UnknownModel(
                        job.model.clone(),
                    )));
                continue;
            };
            let reserve = job.max_len * per_token;
            if !self.make_room(reserve) {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                self.waiting.push_front(job);
                break;
            }
            let Some(model) = self.chat.get(&job.model) else {
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
            let mut running = Running::new(job, cache, fed);
            running.kv_reserved = reserve;
            self.running.push(running);
            self.stats.active.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether a sequence that may hold `reserve` bytes of KV cache can start now, evicting
    /// cached prefixes, oldest first, to make room. With nothing running it always can: a
    /// model's context is cut to the budget when it is added, so no request waits for room
    /// that will never come.
    fn make_room(&mut self, reserve: usize) -> bool {
        let Some(budget) = self.config.kv_memory_bytes else {
            return true;
        };
        let running: usize = self.running.iter().map(|r| r.kv_reserved).sum();
        while running + reserve + self.prefixes.bytes() > budget {
            if !self.prefixes.evict_oldest() {
                break;
            }
        }
        running + reserve + self.prefixes.bytes() <= budget || self.running.is_empty()
    }

    /// One step of every running sequence: for each model, one forward pass over the rows the
    /// scheduler chose, then the token pipeline of each sequence.
    fn step_all(&mut self) {
        let mut done = vec![false; self.running.len()];
        // Sequences whose caller has not read what waits for it sit this step out (a step
        // sends at most two events), and are cancelled once that lasts READER_STALL.
        let mut paused = vec![false; self.running.len()];
        for ((r, d), p) in self
            .running
            .iter_mut()
            .zip(done.iter_mut())
            .zip(paused.iter_mut())
        {
            if r.job.events.is_closed() {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                *d = true;
            } else if r.job.events.capacity() < 2 {
                let since = *r.job.full_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.config.reader_stall {
                    tracing::info!(
                        unread = EVENT_QUEUE,
                        seconds = self.config.reader_stall.as_secs(),
                        "request cancelled: its caller stopped reading"
                    );
                    self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    *d = true;
                } else {
                    *p = true;
                }
            } else {
                r.job.full_since = None;
            }
        }
        if !paused.is_empty() && paused.iter().zip(&done).all(|(p, d)| *p || *d) {
            // Nothing can step until a caller reads: do not spin.
            thread::sleep(Duration::from_millis(2));
        }
        // Paused sequences are skipped like finished ones, but stay.
        let mut skip: Vec<bool> = done.iter().zip(&paused).map(|(d, p)| *d || *p).collect();
        let models: Vec<String> = scheduler::models_in_order(
            self.running
                .iter()
                .zip(&skip)
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
                    &mut skip,
                    &mut self.prefixes,
                    &self.stats,
                    &self.config,
                ),
                None => {
                    for (r, d) in self.running.iter().zip(skip.iter_mut()) {
                        if r.job.model == name {
                            *d = true;
                        }
                    }
                }
            }
        }
        for ((d, s), p) in done.iter_mut().zip(&skip).zip(&paused) {
            *d |= *s && !*p;
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

/// An embedding request being worked through, a batch of texts per turn of the loop.
struct EmbedJob {
    /// The request.
    req: EmbedRequest,
    /// Where the answer goes; closed when the caller gave up.
    reply: oneshot::Sender<Result<EmbedResponse, EngineError>>,
    /// Vectors of the texts embedded so far, in order.
    data: Vec<Embedding>,
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
                let _ = r.job.events.try_send(GenerateEvent::Error(e));
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
                    // The kept caches share the KV budget with the sequences still running.
                    let others: usize = running
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i && !done[*j])
                        .map(|(_, r)| r.kv_reserved)
                        .sum();
                    let room = config
                        .kv_memory_bytes
                        .map_or(usize::MAX, |b| b.saturating_sub(others));
                    prefixes.store(name, history, cache, config.prefix_cache_bytes.min(room));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, model = %name, "generation failed");
                let _ = r.job.events.try_send(GenerateEvent::Error(e));
                done[i] = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::PoisonError;
    use std::time::Duration;

    use super::*;
    use crate::engine::{FinishReason, GenerateRequest, Prompt, Usage};
    use crate::test_utils::{completion, PassLog, Row, TestDecoder, KV_BYTES_PER_TOKEN, POISON};

    fn start(config: EngineConfig, decoder: TestDecoder) -> (EngineHandle<TestDecoder>, PassLog) {
        let format = decoder.format().unwrap();
        let log = decoder.log();
        let engine = Engine::<TestDecoder>::start_with(config);
        engine.add_decoder("test", format, decoder).unwrap();
        (engine, log)
    }

    fn with_max_active(max_active: usize) -> EngineConfig {
        EngineConfig {
            max_active,
            ..EngineConfig::default()
        }
    }

    fn request(prompt: &[u32], max_tokens: usize) -> GenerateRequest {
        let mut req = GenerateRequest::new("test", Prompt::Tokens(prompt.to_vec()));
        req.max_tokens = Some(max_tokens);
        req
    }

    #[derive(Debug, Default)]
    struct Outcome {
        tokens: Vec<u32>,
        done: Option<(FinishReason, Usage)>,
        error: Option<EngineError>,
    }

    fn add(outcome: &mut Outcome, event: GenerateEvent) {
        match event {
            GenerateEvent::Delta { tokens, .. } => outcome.tokens.extend(tokens),
            GenerateEvent::Done {
                finish_reason,
                usage,
            } => outcome.done = Some((finish_reason, usage)),
            GenerateEvent::Error(e) => outcome.error = Some(e),
        }
    }

    fn finish(mut rx: mpsc::Receiver<GenerateEvent>, mut outcome: Outcome) -> Outcome {
        while let Some(event) = rx.blocking_recv() {
            add(&mut outcome, event);
        }
        outcome
    }

    /// Waits for the first event, so the sequence is running.
    fn first(rx: &mut mpsc::Receiver<GenerateEvent>) -> Outcome {
        let mut outcome = Outcome::default();
        add(&mut outcome, rx.blocking_recv().unwrap());
        outcome
    }

    fn passes(log: &PassLog) -> Vec<Vec<Row>> {
        log.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn assert_completed(outcome: &Outcome, prompt: &[u32], count: usize) {
        assert_eq!(outcome.error, None);
        assert_eq!(outcome.tokens, completion(prompt, count));
        let (reason, usage) = outcome.done.unwrap();
        assert_eq!(reason, FinishReason::Length);
        assert_eq!(usage.prompt_tokens, prompt.len());
        assert_eq!(usage.completion_tokens, count);
    }

    #[test]
    fn a_caller_that_stops_reading_waits_then_is_cancelled_and_one_that_reads_is_served() {
        let config = EngineConfig {
            reader_stall: Duration::from_millis(500),
            ..EngineConfig::default()
        };
        let (engine, _) = start(config, TestDecoder::new(true));
        let max = 3 * EVENT_QUEUE;
        // A reader faster than nothing but slower than the model: served in full, exactly.
        let mut slow = engine.generate(request(&[4, 5, 6], max)).unwrap();
        let mut read = Outcome::default();
        while let Some(event) = slow.blocking_recv() {
            add(&mut read, event);
        }
        assert_completed(&read, &[4, 5, 6], max);
        // A caller that stops reading: at most the queue waits for it, then it is cancelled.
        let mut unread = engine.generate(request(&[1, 2, 3], max)).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        // Cancelled, and its slot freed (the counters move one after the other).
        while engine.stats().cancelled.load(Ordering::Relaxed) == 0
            || engine.stats().active.load(Ordering::Relaxed) != 0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "still holding a slot for a caller that does not read"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut out = Outcome::default();
        while let Ok(event) = unread.try_recv() {
            add(&mut out, event);
        }
        assert_eq!(out.tokens, completion(&[1, 2, 3], EVENT_QUEUE - 1));
        assert_eq!(out.done, None);
    }

    #[test]
    fn a_completion_follows_the_model() {
        let (engine, log) = start(EngineConfig::default(), TestDecoder::new(true));
        let out = finish(
            engine.generate(request(&[5, 6, 7], 8)).unwrap(),
            Outcome::default(),
        );
        assert_completed(&out, &[5, 6, 7], 8);
        // The prompt in one pass, then one pass per token fed back (the last is not fed).
        assert_eq!(passes(&log).len(), 8);
        assert_eq!(engine.stats().forward_passes.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn prompts_join_while_others_decode() {
        let decoder = TestDecoder::new(true).with_delay(Duration::from_millis(2));
        let (engine, log) = start(EngineConfig::default(), decoder);
        let a_prompt = [1, 2, 3, 4];
        let mut a = engine.generate(request(&a_prompt, 100)).unwrap();
        let a_first = first(&mut a);
        let b_prompt = [10, 11, 12];
        let b = engine.generate(request(&b_prompt, 5)).unwrap();
        assert_completed(&finish(b, Outcome::default()), &b_prompt, 5);
        assert_completed(&finish(a, a_first), &a_prompt, 100);
        let joined = passes(&log).into_iter().any(|pass| {
            pass.len() == 2
                && pass[0].tokens.len() == 1
                && pass[0].start > a_prompt.len()
                && pass[1].start == 0
                && pass[1].tokens == b_prompt
        });
        assert!(joined, "B's prompt ran in one pass with A's decoding");
    }

    #[test]
    fn max_active_is_respected_and_requests_start_in_order() {
        let config = with_max_active(2);
        let decoder = TestDecoder::new(true).with_delay(Duration::from_millis(1));
        let (engine, log) = start(config, decoder);
        let prompts: Vec<Vec<u32>> = (0..5u32).map(|i| vec![10 + i, 20 + i, 30 + i]).collect();
        let receivers: Vec<_> = prompts
            .iter()
            .map(|p| engine.generate(request(p, 12)).unwrap())
            .collect();
        for (rx, prompt) in receivers.into_iter().zip(&prompts) {
            assert_completed(&finish(rx, Outcome::default()), prompt, 12);
        }
        let passes = passes(&log);
        assert!(passes.iter().all(|p| p.len() <= 2), "at most 2 rows a pass");
        let started: Vec<usize> = prompts
            .iter()
            .map(|prompt| {
                passes
                    .iter()
                    .position(|p| p.iter().any(|r| r.start == 0 && &r.tokens == prompt))
                    .unwrap()
            })
            .collect();
        assert!(
            started.windows(2).all(|w| w[0] <= w[1]),
            "first come, first served: {started:?}"
        );
    }

    #[test]
    fn cancelling_mid_batch_frees_the_slot() {
        let config = with_max_active(1);
        let decoder = TestDecoder::new(true).with_delay(Duration::from_millis(1));
        let (engine, log) = start(config, decoder);
        let mut a = engine.generate(request(&[1, 2, 3], 1000)).unwrap();
        first(&mut a);
        let b_prompt = [7, 8, 9];
        let b = engine.generate(request(&b_prompt, 5)).unwrap();
        drop(a);
        assert_completed(&finish(b, Outcome::default()), &b_prompt, 5);
        assert_eq!(engine.stats().cancelled.load(Ordering::Relaxed), 1);
        let a_rows = passes(&log)
            .iter()
            .flatten()
            .filter(|r| r.cache == 0)
            .count();
        assert!(a_rows < 1000, "A stopped when cancelled ({a_rows} rows)");
    }

    #[test]
    fn a_prefix_cache_hit_continues_from_the_kept_cache() {
        let (engine, log) = start(EngineConfig::default(), TestDecoder::new(true));
        let a_prompt: Vec<u32> = (1..=20).collect();
        let a = engine.generate(request(&a_prompt, 3)).unwrap();
        assert_completed(&finish(a, Outcome::default()), &a_prompt, 3);
        let mut b_prompt = a_prompt.clone();
        b_prompt.extend([30, 31]);
        let b = finish(
            engine.generate(request(&b_prompt, 4)).unwrap(),
            Outcome::default(),
        );
        assert_completed(&b, &b_prompt, 4);
        assert_eq!(b.done.unwrap().1.cached_tokens, 20);
        assert_eq!(
            engine.stats().cached_prompt_tokens.load(Ordering::Relaxed),
            20
        );
        let b_first = passes(&log)
            .into_iter()
            .flatten()
            .find(|r| r.tokens.starts_with(&[30, 31]))
            .unwrap();
        assert_eq!(b_first.start, 20, "only the new tokens were fed");
    }

    #[test]
    fn a_forward_error_fails_only_the_sequence_concerned() {
        let decoder = TestDecoder::new(true).with_delay(Duration::from_millis(1));
        let (engine, _log) = start(EngineConfig::default(), decoder);
        let a_prompt = [1, 2, 3];
        let mut a = engine.generate(request(&a_prompt, 50)).unwrap();
        let a_first = first(&mut a);
        let b = finish(
            engine.generate(request(&[4, POISON, 5], 5)).unwrap(),
            Outcome::default(),
        );
        assert!(
            matches!(&b.error, Some(EngineError::Internal(m)) if m.contains("poisoned row")),
            "{:?}",
            b.error
        );
        assert_eq!(b.done, None);
        assert_completed(&finish(a, a_first), &a_prompt, 50);
    }

    #[test]
    fn requests_over_the_limits_are_refused_before_any_work() {
        let (engine, log) = start(EngineConfig::default(), TestDecoder::new(true));
        let mut stops = request(&[1, 2, 3], 4);
        stops.stop = vec!["s".into(); 5];
        let mut long_stop = request(&[1, 2, 3], 4);
        long_stop.stop = vec!["s".repeat(257)];
        let mut logprobs = request(&[1, 2, 3], 4);
        logprobs.logprobs = Some(100_000);
        for req in [stops, long_stop, logprobs] {
            let err = engine.generate(req).map(|_| ()).unwrap_err();
            assert!(matches!(err, EngineError::InvalidRequest(_)), "{err:?}");
        }
        // Checked before the model is even looked up.
        let embed = EmbedRequest {
            model: "no-embedding-model".into(),
            input: vec!["x".into(); 2049],
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = runtime.block_on(engine.embed(embed)).unwrap_err();
        assert!(
            matches!(&err, EngineError::InvalidRequest(m) if m.contains("2048")),
            "{err:?}"
        );
        assert!(passes(&log).is_empty());
        assert_eq!(engine.stats().queued.load(Ordering::Relaxed), 0);
    }

    /// An engine whose KV memory budget holds `tokens` tokens of the test decoder's cache.
    fn with_kv_tokens(tokens: usize) -> EngineConfig {
        EngineConfig {
            kv_memory_bytes: Some(tokens * KV_BYTES_PER_TOKEN),
            ..EngineConfig::default()
        }
    }

    #[test]
    fn a_request_the_kv_budget_can_never_hold_is_refused_at_once() {
        let (engine, log) = start(with_kv_tokens(100), TestDecoder::new(true));
        assert_eq!(
            engine.models()[0].context_length,
            100,
            "context cut to the budget"
        );
        let prompt: Vec<u32> = (1..=10).collect();
        let err = engine
            .generate(request(&prompt, 91))
            .map(|_| ())
            .unwrap_err();
        assert_eq!(
            err,
            EngineError::ContextLength {
                prompt_tokens: 10,
                max_tokens: 91,
                context_length: 100
            }
        );
        assert!(passes(&log).is_empty());
        let out = finish(
            engine.generate(request(&prompt, 90)).unwrap(),
            Outcome::default(),
        );
        assert_completed(&out, &prompt, 90);
    }

    #[test]
    fn requests_that_together_exceed_the_kv_budget_run_one_after_the_other() {
        let decoder = TestDecoder::new(true).with_delay(Duration::from_millis(1));
        let (engine, log) = start(with_kv_tokens(100), decoder);
        let a_prompt: Vec<u32> = (1..=10).collect();
        let b_prompt: Vec<u32> = (20..=29).collect();
        let mut a = engine.generate(request(&a_prompt, 60)).unwrap();
        let a_first = first(&mut a);
        let b = engine.generate(request(&b_prompt, 60)).unwrap();
        assert_completed(&finish(a, a_first), &a_prompt, 60);
        assert_completed(&finish(b, Outcome::default()), &b_prompt, 60);
        let passes = passes(&log);
        let holds =
            |prompt: &[u32], pass: &[Row]| pass.iter().any(|r| r.start == 0 && r.tokens == prompt);
        let a_cache = passes
            .iter()
            .flatten()
            .find(|r| r.start == 0)
            .unwrap()
            .cache;
        let a_last = passes
            .iter()
            .rposition(|p| p.iter().any(|r| r.cache == a_cache))
            .unwrap();
        let b_start = passes.iter().position(|p| holds(&b_prompt, p)).unwrap();
        assert!(
            b_start > a_last,
            "B started in pass {b_start}, while A ran until pass {a_last}"
        );
        assert!(passes.iter().all(|p| p.len() == 1), "never both at once");
    }

    #[test]
    fn cached_prefixes_make_room_for_a_new_request() {
        let (engine, _) = start(with_kv_tokens(100), TestDecoder::new(true));
        let a_prompt: Vec<u32> = (1..=20).collect();
        let a = engine.generate(request(&a_prompt, 40)).unwrap();
        assert_completed(&finish(a, Outcome::default()), &a_prompt, 40);
        // A's cache is kept; B needs room for 70 tokens, so it goes.
        let b_prompt: Vec<u32> = (30..=39).collect();
        let b = engine.generate(request(&b_prompt, 60)).unwrap();
        assert_completed(&finish(b, Outcome::default()), &b_prompt, 60);
        let again = finish(
            engine.generate(request(&a_prompt, 4)).unwrap(),
            Outcome::default(),
        );
        assert_completed(&again, &a_prompt, 4);
        assert_eq!(
            again.done.unwrap().1.cached_tokens,
            0,
            "A's prefix was evicted"
        );
        // Within the budget a kept prefix is reused.
        let c = finish(
            engine.generate(request(&a_prompt, 4)).unwrap(),
            Outcome::default(),
        );
        assert!(c.done.unwrap().1.cached_tokens >= 16);
    }

    #[test]
    fn models_that_are_not_invariant_run_each_sequence_alone() {
        let decoder = TestDecoder::new(false).with_delay(Duration::from_millis(1));
        let (engine, log) = start(EngineConfig::default(), decoder);
        let mut a = engine.generate(request(&[1, 2, 3], 20)).unwrap();
        let a_first = first(&mut a);
        let b = engine.generate(request(&[4, 5, 6], 20)).unwrap();
        assert_completed(&finish(b, Outcome::default()), &[4, 5, 6], 20);
        assert_completed(&finish(a, a_first), &[1, 2, 3], 20);
        let passes = passes(&log);
        assert!(passes.iter().all(|p| p.len() == 1));
        assert_eq!(
            engine.stats().forward_passes.load(Ordering::Relaxed),
            passes.len() as u64
        );
    }
}
