//! The chunks of a download still to fetch, shared by its workers: runs are taken from it,
//! and what a worker could not fetch goes back in for another.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Chunks asked for in one request: enough to amortise the request, few enough that the last
/// requests of a file spread over every stream.
pub(super) const CHUNKS_PER_RUN: usize = 8;

/// The chunks of a download still to fetch, shared by its workers.
#[derive(Debug, Default)]
pub(super) struct Queue {
    state: Mutex<QueueState>,
    /// Signalled when taken chunks are done with, some perhaps back in the queue.
    changed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct QueueState {
    waiting: VecDeque<usize>,
    /// Chunks taken by workers and not yet done with.
    taken: usize,
}

impl Queue {
    pub(super) fn new(chunks: VecDeque<usize>) -> Self {
        Self {
            state: Mutex::new(QueueState {
                waiting: chunks,
                taken: 0,
            }),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Takes a run of up to [`CHUNKS_PER_RUN`] consecutive chunks. When none is waiting but
    /// other workers hold some, waits: what fails with them comes back. `None` when the
    /// download needs nothing more.
    pub(super) async fn take(queue: &Arc<Self>) -> Option<Taken> {
        let run = queue.take_run().await?;
        Some(Taken {
            queue: Arc::clone(queue),
            run,
            settled: false,
        })
    }

    async fn take_run(&self) -> Option<Vec<usize>> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut state = self.state.lock().ok()?;
                if let Some(first) = state.waiting.pop_front() {
                    let mut run = vec![first];
                    while run.len() < CHUNKS_PER_RUN
                        && state.waiting.front() == Some(&(first + run.len()))
                    {
                        state.waiting.pop_front();
                        run.push(first + run.len());
                    }
                    state.taken += run.len();
                    return Some(run);
                }
                if state.taken == 0 {
                    return None;
                }
            }
            changed.await;
        }
    }

    /// Ends a run of `taken` chunks; `again` go back at the end of the queue, for another
    /// stream or provider to take next.
    fn done(&self, taken: usize, again: &[usize]) {
        if let Ok(mut state) = self.state.lock() {
            state.waiting.extend(again.iter().copied());
            state.taken = state.taken.saturating_sub(taken);
        }
        self.changed.notify_waiters();
    }

    /// Chunks not fetched yet.
    pub(super) fn left(&self) -> usize {
        self.state
            .lock()
            .map_or(usize::MAX, |s| s.waiting.len() + s.taken)
    }
}

/// A run taken from a [`Queue`]; given back whole if dropped before [`Taken::done`] (a worker
/// that panicked), so the others do not wait for it forever.
#[derive(Debug)]
pub(super) struct Taken {
    queue: Arc<Queue>,
    /// The chunks of the run, in order.
    pub(super) run: Vec<usize>,
    settled: bool,
}

impl Taken {
    /// Ends the run; `again` go back in the queue.
    pub(super) fn done(mut self, again: &[usize]) {
        self.settled = true;
        self.queue.done(self.run.len(), again);
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if !self.settled {
            self.queue.done(self.run.len(), &self.run);
        }
    }
}
