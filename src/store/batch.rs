//! A queue of requests answered in batches by one worker at a time, with no task waiting on an
//! idle queue. It knows nothing of SQL: a [`Batch`] says how a batch is answered.
//!
//! The request that finds the queue idle starts a runner on its own runtime (on an actix worker,
//! its own thread), which takes batches until the queue is empty, then gives the worker back:
//! that saves two thread hops per batch over a runner living on another runtime. A runner whose
//! runtime stops (actix stops an idle worker's runtime at once at shutdown) hands the queue to a
//! runner on the runtime the queue was made on, so a queue is never stuck.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A kind of request, and how a batch of them is answered.
pub(super) trait Batch: Sized + Send + 'static {
    /// What answers a batch: a database connection, say. One per queue, so batches of one
    /// queue never run at once.
    type Worker: Send + 'static;

    /// Answers every request of `batch`.
    fn serve(worker: &mut Self::Worker, batch: Vec<Self>) -> impl Future<Output = ()> + Send;

    /// The worker's runner was dropped in the middle of a batch: it may hold half a statement.
    fn interrupted(worker: &mut Self::Worker);
}

/// Requests waiting, and the worker that answers them; cheap to share.
pub(super) struct Queue<R: Batch> {
    state: Mutex<State<R>>,
    /// The runtime the queue was made on, which outlives the HTTP workers.
    runtime: tokio::runtime::Handle,
}

struct State<R: Batch> {
    waiting: Vec<R>,
    /// `None` while a runner has it.
    worker: Option<R::Worker>,
}

impl<R: Batch> Queue<R> {
    /// Must be called inside a tokio runtime, which then rescues runners of stopped runtimes.
    pub(super) fn new(worker: R::Worker) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                waiting: Vec::new(),
                worker: Some(worker),
            }),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<R>> {
        // Every critical section is a push or a swap; a panic cannot leave one half done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `request`; it is answered in the next batch. A request dropped unanswered (the
    /// runtimes shut down) drops its reply channel, which its caller sees.
    pub(super) fn push(self: &Arc<Self>, request: R) {
        let idle_worker = {
            let mut state = self.lock();
            state.waiting.push(request);
            state.worker.take()
        };
        if let Some(worker) = idle_worker {
            tokio::spawn(
                Runner {
                    queue: Arc::clone(self),
                    worker: Some(worker),
                    rescued: false,
                }
                .run(),
            );
        }
    }
}

/// The one task answering a queue while it is not empty. Dropped unfinished, it hands what is
/// waiting to a runner on the queue's runtime, or, if it was that runner already, gives the
/// worker back and drops what is waiting.
struct Runner<R: Batch> {
    queue: Arc<Queue<R>>,
    worker: Option<R::Worker>,
    /// Started on the queue's runtime after a runner was dropped.
    rescued: bool,
}

impl<R: Batch> Runner<R> {
    async fn run(mut self) {
        loop {
            let batch = {
                let mut state = self.queue.lock();
                if state.waiting.is_empty() {
                    state.worker = self.worker.take();
                    return;
                }
                std::mem::take(&mut state.waiting)
            };
            let Some(worker) = self.worker.as_mut() else {
                return;
            };
            R::serve(worker, batch).await;
        }
    }
}

impl<R: Batch> Drop for Runner<R> {
    fn drop(&mut self) {
        let Some(mut worker) = self.worker.take() else {
            return;
        };
        R::interrupted(&mut worker);
        let mut state = self.queue.lock();
        if self.rescued || state.waiting.is_empty() {
            state.worker = Some(worker);
            let waiting = std::mem::take(&mut state.waiting);
            drop(state);
            drop(waiting);
        } else {
            drop(state);
            let runner = Runner {
                queue: Arc::clone(&self.queue),
                worker: Some(worker),
                rescued: true,
            };
            self.queue.runtime.spawn(runner.run());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    /// Doubles numbers, and counts the batches it served.
    struct Double {
        n: u32,
        reply: oneshot::Sender<u32>,
    }

    impl Batch for Double {
        type Worker = usize;

        async fn serve(batches: &mut usize, batch: Vec<Self>) {
            *batches += 1;
            for request in batch {
                let _ = request.reply.send(request.n * 2);
            }
        }

        fn interrupted(_: &mut usize) {}
    }

    fn ask(queue: &Arc<Queue<Double>>, n: u32) -> oneshot::Receiver<u32> {
        let (reply, answer) = oneshot::channel();
        queue.push(Double { n, reply });
        answer
    }

    #[tokio::test]
    async fn requests_queued_together_are_answered_in_one_batch() {
        let queue = Queue::<Double>::new(0);
        let answers: Vec<_> = (0..10).map(|n| ask(&queue, n)).collect();
        for (n, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer.await.unwrap(), 2 * n as u32);
        }
        assert_eq!(queue.lock().worker, Some(1), "one batch, worker back");
    }

    /// actix stops an idle worker's runtime at once at shutdown, with a runner on it that other
    /// workers' requests wait behind: the queue's own runtime must take them over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_runner_dropped_with_its_runtime_hands_its_queue_to_the_queue_runtime() {
        let queue = Queue::<Double>::new(0);
        // A worker runtime that spawns the runner and then stops before ever running it.
        let doomed = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let answer = {
            let _inside = doomed.enter();
            ask(&queue, 21)
        };
        doomed.shutdown_background();

        let answer = tokio::time::timeout(std::time::Duration::from_secs(5), answer)
            .await
            .expect("the queued request is answered")
            .expect("by a runner, not dropped");
        assert_eq!(answer, 42);
        // Idle again with its worker back: the next request is served too.
        assert_eq!(ask(&queue, 1).await.unwrap(), 2);
    }
}
