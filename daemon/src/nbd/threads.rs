//! The threads that serve connections. Each runs an event loop of its own (a current-thread
//! runtime), and a connection stays on the thread it was given from accept to close.
//!
//! Why not tokio's work-stealing pool: a connection is one task (its requests are futures polled
//! inside it), so stealing can only move it between threads, never split it. On a 2-core machine
//! where the client shares the cores, the pool's idle worker was woken to look for work on most
//! wake-ups: a profile of 4 KiB random writes over one connection put 17% of its samples in
//! context switches of the worker threads (perf inflates that share), and one worker served that
//! connection 10-20% faster than two. With a loop per thread, a thread without connections
//! sleeps; in A/B runs that row went from 0.86-0.95x to 0.99-1.16x nbdkit.

use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

thread_local! {
    /// The connections served by this thread, when it is a connection thread.
    static THIS_THREAD_CONNECTIONS: std::cell::OnceCell<Gauge> = const { std::cell::OnceCell::new() };
}

/// Whether the calling thread serves no connection besides the caller's: true on a connection
/// thread with one seat taken, and on any other thread (a test's runtime), where no other
/// connection is known to wait for it.
pub fn alone_on_this_thread() -> bool {
    THIS_THREAD_CONNECTIONS.with(|connections| connections.get().is_none_or(|c| c.get() <= 1))
}

/// How long a stopping thread waits for blocking work its connections started (a write through
/// the threads engine, a map being persisted) before leaving it to the process exit.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// The connection threads; `assign` picks the one serving the fewest connections.
pub struct ConnectionThreads {
    threads: Vec<ConnectionThread>,
    stop: CancellationToken,
    /// Taken by the first `stop`.
    joins: Mutex<Vec<JoinHandle<()>>>,
}

struct ConnectionThread {
    runtime: Handle,
    /// Connections on this thread; also exported as a metric.
    connections: Gauge,
}

/// A connection's place on its thread; the thread's count drops when this does.
pub struct ThreadSeat {
    connections: Gauge,
}

impl Drop for ThreadSeat {
    fn drop(&mut self) {
        self.connections.dec();
    }
}

impl ConnectionThreads {
    /// Starts `count` threads (at least one), each with a running event loop.
    pub fn start(count: usize, metrics: &Metrics) -> std::io::Result<ConnectionThreads> {
        let stop = CancellationToken::new();
        let mut threads = Vec::new();
        let mut joins = Vec::new();
        for index in 0..count.max(1) {
            let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
            let thread_stop = stop.clone();
            let connections = metrics.connection_thread(index);
            let thread_connections = connections.clone();
            let join = std::thread::Builder::new()
                .name(format!("evsd-conn-{index}"))
                .spawn(move || {
                    THIS_THREAD_CONNECTIONS.with(|c| {
                        c.get_or_init(|| thread_connections);
                    });
                    let built = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .thread_name(format!("evsd-conn-{index}-blocking"))
                        .build();
                    let runtime = match built {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(runtime.handle().clone()));
                    // Tasks given to this runtime run while the thread blocks here.
                    runtime.block_on(thread_stop.cancelled());
                    runtime.shutdown_timeout(STOP_WAIT);
                })?;
            let runtime = ready_rx.recv().map_err(|_| {
                std::io::Error::other(format!("connection thread {index} exited while starting"))
            })??;
            threads.push(ConnectionThread {
                runtime,
                connections,
            });
            joins.push(join);
        }
        Ok(ConnectionThreads {
            threads,
            stop,
            joins: Mutex::new(joins),
        })
    }

    /// The runtime of the thread with the fewest connections, and the seat that counts this one
    /// there. Ties go to the lowest index, so one client keeps to one thread.
    pub fn assign(&self) -> (Handle, ThreadSeat) {
        let thread = self
            .threads
            .iter()
            .min_by_key(|t| t.connections.get())
            .expect("at least one connection thread");
        thread.connections.inc();
        let seat = ThreadSeat {
            connections: thread.connections.clone(),
        };
        (thread.runtime.clone(), seat)
    }

    /// Stops every thread's event loop, dropping tasks still on it, and waits for the threads.
    /// Call it once connections are done; it blocks, so not from inside a runtime's worker.
    pub fn stop(&self) {
        self.stop.cancel();
        let joins = std::mem::take(&mut *self.joins.lock().unwrap_or_else(|e| e.into_inner()));
        for join in joins {
            let name = join.thread().name().map(str::to_owned);
            if join.join().is_err() {
                tracing::error!(thread = ?name, "a connection thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(threads: &ConnectionThreads) -> Vec<i64> {
        threads
            .threads
            .iter()
            .map(|t| t.connections.get())
            .collect()
    }

    #[test]
    fn assigns_to_the_least_busy_thread_and_frees_seats() {
        let metrics = Metrics::new();
        let threads = ConnectionThreads::start(2, &metrics).unwrap();
        let (_, first) = threads.assign();
        let (_, second) = threads.assign();
        assert_eq!(counts(&threads), vec![1, 1]);
        drop(first);
        assert_eq!(counts(&threads), vec![0, 1]);
        let (_, third) = threads.assign();
        assert_eq!(
            counts(&threads),
            vec![1, 1],
            "the freed seat is taken again"
        );
        drop((second, third));
        assert_eq!(metrics.connection_thread(0).get(), 0);
        assert_eq!(metrics.connection_thread(1).get(), 0);
        threads.stop();
    }

    #[test]
    fn tasks_run_on_their_own_thread() {
        let threads = ConnectionThreads::start(2, &Metrics::new()).unwrap();
        let (runtime, _seat) = threads.assign();
        let (tx, rx) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let name = std::thread::current().name().map(str::to_owned);
            tx.send(name).unwrap();
        });
        let name = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(name.as_deref(), Some("evsd-conn-0"));
        threads.stop();
    }

    #[test]
    fn a_thread_knows_whether_it_serves_other_connections() {
        let threads = ConnectionThreads::start(1, &Metrics::new()).unwrap();
        let alone_there = |runtime: &Handle| {
            let (tx, rx) = std::sync::mpsc::channel();
            runtime.spawn(async move { tx.send(alone_on_this_thread()).unwrap() });
            rx.recv_timeout(Duration::from_secs(5)).unwrap()
        };
        let (runtime, first) = threads.assign();
        assert!(alone_there(&runtime), "one connection");
        let (_, second) = threads.assign();
        assert!(!alone_there(&runtime), "two connections on the one thread");
        drop(first);
        assert!(alone_there(&runtime), "one left");
        drop(second);
        assert!(alone_on_this_thread(), "not a connection thread");
        threads.stop();
    }
}
