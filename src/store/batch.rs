//! A queue of requests answered in batches by one worker at a time, with no task waiting on an
//! idle queue. It knows nothing of SQL: a [`Batch`] says how a batch is answered.
//!
//! The queue is bounded: each class of request (a [`Batch`] says which class a request is) may
//! have only so many requests waiting, and a request beyond its class's bound is refused at once
//! ([`Full`]), so the caller can say "try again" instead of waiting behind an ever longer line.
//! Classes never take each other's room: a flood of one kind cannot starve another.
//!
//! The request that finds the queue idle starts a runner on its own runtime (on an actix worker,
//! its own thread), which takes batches until the queue is empty, then gives the worker back:
//! that saves two thread hops per batch over a runner living on another runtime. A runner whose
//! runtime stops (actix stops an idle worker's runtime at once at shutdown) hands the queue to a
//! runner on the runtime the queue was made on, so a queue is never stuck.

use std::sync::Arc;

use parking_lot::Mutex;

/// A kind of request, and how a batch of them is answered.
pub(super) trait Batch: Sized + Send + 'static {
    /// What answers a batch: a database connection, say. One per queue, so batches of one
    /// queue never run at once.
    type Worker: Send + 'static;

    /// Which of the queue's bounds this request counts against: an index into the bounds the
    /// queue was made with.
    fn class(&self) -> usize {
        0
    }

    /// Answers every request of `batch`.
    fn serve(worker: &mut Self::Worker, batch: Vec<Self>) -> impl Future<Output = ()> + Send;

    /// The worker's runner was dropped in the middle of a batch: it may hold half a statement.
    fn interrupted(worker: &mut Self::Worker);
}

/// Requests waiting, and the worker that answers them; cheap to share.
pub(super) struct Queue<R: Batch> {
    state: Mutex<State<R>>,
    /// How many requests of each class may wait at once.
    bounds: Box<[usize]>,
    /// The runtime the queue was made on, which outlives the HTTP workers.
    runtime: tokio::runtime::Handle,
}

struct State<R: Batch> {
    waiting: Vec<R>,
    /// How many of `waiting` are of each class.
    counts: Vec<usize>,
    /// `None` while a runner has it.
    worker: Option<R::Worker>,
}

impl<R: Batch> State<R> {
    fn take_waiting(&mut self) -> Vec<R> {
        self.counts.fill(0);
        std::mem::take(&mut self.waiting)
    }
}

/// A request refused because its class already has `bound` requests waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Full {
    pub(super) bound: usize,
}

impl<R: Batch> Queue<R> {
    /// A queue whose requests of class `c` may have `bounds[c]` waiting at once (a class past
    /// the end counts as the last one). Must be called inside a tokio runtime, which then rescues
    /// runners of stopped runtimes.
    pub(super) fn new(worker: R::Worker, bounds: &[usize]) -> Arc<Self> {
        let bounds: Box<[usize]> = if bounds.is_empty() {
            Box::new([usize::MAX])
        } else {
            bounds.into()
        };
        Arc::new(Self {
            state: Mutex::new(State {
                waiting: Vec::new(),
                counts: vec![0; bounds.len()],
                worker: Some(worker),
            }),
            bounds,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// How many requests of each class wait for the next batch (those of the batch being
    /// answered not counted).
    pub(super) fn waiting(&self) -> Vec<usize> {
        self.state.lock().counts.clone()
    }

    /// Queues `request`; it is answered in the next batch. A request dropped unanswered (the
    /// runtimes shut down) drops its reply channel, which its caller sees. Refused, and dropped,
    /// when its class has as many requests waiting as its bound allows.
    pub(super) fn push(self: &Arc<Self>, request: R) -> Result<(), Full> {
        let class = request.class().min(self.bounds.len() - 1);
        let bound = self.bounds[class];
        let idle_worker = {
            let mut state = self.state.lock();
            if state.counts[class] >= bound {
                return Err(Full { bound });
            }
            state.counts[class] += 1;
            state.waiting.push(request);
            state.worker.take()
        };
        self.start(idle_worker);
        Ok(())
    }

    /// Queues all of `requests` at once, so that they are answered in the same batch; or none
    /// of them, when one's class has not room for its share. A share larger than its class's
    /// whole room is let in when nothing of its class is waiting, so that it is not refused
    /// forever.
    pub(super) fn push_many(self: &Arc<Self>, requests: Vec<R>) -> Result<(), Full> {
        let last = self.bounds.len() - 1;
        let mut adding = vec![0; self.bounds.len()];
        for request in &requests {
            adding[request.class().min(last)] += 1;
        }
        let idle_worker = {
            let mut state = self.state.lock();
            for (class, &n) in adding.iter().enumerate() {
                let bound = self.bounds[class];
                if n > 0 && state.counts[class] + n > bound.max(n) {
                    return Err(Full { bound });
                }
            }
            for (count, n) in state.counts.iter_mut().zip(&adding) {
                *count += n;
            }
            state.waiting.extend(requests);
            state.worker.take()
        };
        self.start(idle_worker);
        Ok(())
    }

    /// Starts a runner with the worker a push found idle.
    fn start(self: &Arc<Self>, idle_worker: Option<R::Worker>) {
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
                let mut state = self.queue.state.lock();
                if state.waiting.is_empty() {
                    state.worker = self.worker.take();
                    return;
                }
                state.take_waiting()
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
        let mut state = self.queue.state.lock();
        if self.rescued || state.waiting.is_empty() {
            state.worker = Some(worker);
            let waiting = state.take_waiting();
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
        queue.push(Double { n, reply }).expect("an unbounded queue");
        answer
    }

    #[tokio::test]
    async fn requests_queued_together_are_answered_in_one_batch() {
        let queue = Queue::<Double>::new(0, &[]);
        let answers: Vec<_> = (0..10).map(|n| ask(&queue, n)).collect();
        for (n, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer.await.unwrap(), 2 * n as u32);
        }
        assert_eq!(queue.state.lock().worker, Some(1), "one batch, worker back");
    }

    /// actix stops an idle worker's runtime at once at shutdown, with a runner on it that other
    /// workers' requests wait behind: the queue's own runtime must take them over.
    #[tokio::test]
    async fn requests_pushed_together_share_a_batch_and_a_share_over_the_room_waits_alone() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let queue = Queue::<Gated>::new(Arc::clone(&gate), &[2]);
        let group = |n: usize| {
            let (requests, answers): (Vec<_>, Vec<_>) = (0..n)
                .map(|_| {
                    let (reply, answer) = oneshot::channel();
                    (Gated { class: 0, reply }, answer)
                })
                .unzip();
            queue.push_many(requests).map(|()| answers)
        };
        // Three over a room of two: let in, since nothing of its class waits.
        let first = group(3).expect("a share over the room, alone");
        while queue.waiting() != [0] {
            tokio::task::yield_now().await;
        }
        let second = group(2).expect("fits the room");
        assert_eq!(
            group(1).unwrap_err(),
            Full { bound: 2 },
            "nothing of it queued"
        );
        assert_eq!(queue.waiting(), [2]);
        gate.add_permits(2);
        for answer in first.into_iter().chain(second) {
            answer.await.expect("answered");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_runner_dropped_with_its_runtime_hands_its_queue_to_the_queue_runtime() {
        let queue = Queue::<Double>::new(0, &[]);
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

    /// Answers a batch only once the test lets it through, one permit per batch.
    struct Gated {
        class: usize,
        reply: oneshot::Sender<()>,
    }

    impl Batch for Gated {
        type Worker = Arc<tokio::sync::Semaphore>;

        fn class(&self) -> usize {
            self.class
        }

        async fn serve(gate: &mut Arc<tokio::sync::Semaphore>, batch: Vec<Self>) {
            gate.acquire().await.expect("the gate stays open").forget();
            for request in batch {
                let _ = request.reply.send(());
            }
        }

        fn interrupted(_: &mut Arc<tokio::sync::Semaphore>) {}
    }

    fn knock(queue: &Arc<Queue<Gated>>, class: usize) -> Result<oneshot::Receiver<()>, Full> {
        let (reply, answer) = oneshot::channel();
        queue.push(Gated { class, reply }).map(|()| answer)
    }

    #[tokio::test]
    async fn a_full_class_refuses_its_next_request_and_leaves_the_other_classes_their_room() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let queue = Queue::<Gated>::new(Arc::clone(&gate), &[2, 1]);
        // The first request starts the runner, which takes it and waits at the gate.
        let first = knock(&queue, 0).unwrap();
        while queue.waiting() != [0, 0] {
            tokio::task::yield_now().await;
        }

        let mut admitted = vec![knock(&queue, 0).unwrap(), knock(&queue, 0).unwrap()];
        assert_eq!(knock(&queue, 0).unwrap_err(), Full { bound: 2 });
        admitted.push(knock(&queue, 1).unwrap());
        assert_eq!(knock(&queue, 1).unwrap_err(), Full { bound: 1 });
        let past_the_end = knock(&queue, 7).unwrap_err();
        assert_eq!(past_the_end, Full { bound: 1 }, "counted as the last class");
        assert_eq!(queue.waiting(), [2, 1]);

        gate.add_permits(2);
        first.await.expect("answered");
        for answer in admitted {
            answer.await.expect("every admitted request is answered");
        }
        assert_eq!(queue.waiting(), [0, 0]);
        gate.add_permits(1);
        knock(&queue, 0)
            .expect("room again once the batch was taken")
            .await
            .unwrap();
    }
}
