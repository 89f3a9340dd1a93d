//! What the user sees and does while a run goes on: the progress bar with event lines above it,
//! and Ctrl-C (first: stop writing and report; second: quit at once, removing what the run made).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::view::View;

/// The live output of a run: a progress bar with throughput and lag (hidden with `--quiet`), and
/// event lines printed above it, or straight to stdout when the bar is hidden (a hidden bar would
/// swallow them, and the events belong in the log).
#[derive(Clone)]
pub struct Console {
    pub bar: ProgressBar,
    /// Written entries and when, at the last update: the rate shown is since then.
    pub last: Arc<Mutex<(Instant, u64)>>,
}

impl Console {
    pub fn new(quiet: bool, duration: Duration) -> Result<Console, indicatif::style::TemplateError> {
        let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(duration.as_millis() as u64) };
        bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {msg}")?);
        Ok(Console { bar, last: Arc::new(Mutex::new((Instant::now(), 0))) })
    }

    pub fn line(&self, s: impl AsRef<str>) {
        // Hidden by --quiet, or because stderr is not a terminal.
        match self.bar.is_hidden() {
            true => println!("{}", s.as_ref()),
            false => self.bar.println(s.as_ref()),
        }
    }

    /// Shows `written` entries at `elapsed`, the write rate since the last update, and each
    /// replica's state and lag as the primary sees it.
    pub fn progress(&self, elapsed: Duration, written: u64, views: &[View]) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let rate = written.saturating_sub(last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
        *last = (Instant::now(), written);
        let lag: Vec<String> =
            views.iter().map(|r| format!("{} {}, lag {}e/{}ms", r.name, r.state, r.lag_entries, r.lag_ms)).collect();
        self.bar.set_position(elapsed.as_millis() as u64);
        self.bar.set_message(format!("written {written} ({rate:.0}/s) | {}", lag.join(" | ")));
    }
}

/// What a run that ends without a report leaves behind, and removes: its temporary folder and the
/// report file it created (if still empty).
#[derive(Clone, Default)]
pub struct Leftovers {
    pub dir: Option<PathBuf>,
    pub report: Option<PathBuf>,
}

impl Leftovers {
    pub fn remove(&self) {
        if let Some(dir) = &self.dir {
            // The nodes may still be creating files in it: retry a few times.
            for _ in 0..5 {
                if std::fs::remove_dir_all(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(report) = &self.report {
            if std::fs::metadata(report).is_ok_and(|m| m.len() == 0) {
                let _ = std::fs::remove_file(report);
            }
        }
    }
}

/// Resolves at the next SIGINT or SIGTERM. Holds its handlers for the whole run, so a second
/// signal is seen even if it arrives while the first is being handled.
struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals { int: signal(SignalKind::interrupt())?, term: signal(SignalKind::terminate())? })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Sets the returned flag at the first SIGINT/SIGTERM (printing `first`). With `quit`, a second
/// signal exits at once with status 130; `process::exit` runs no destructors, so the leftovers are
/// removed by hand first.
pub fn watch_signals(
    console: &Console,
    first: &'static str,
    quit: Option<Leftovers>,
) -> std::io::Result<Arc<AtomicBool>> {
    let mut signals = Signals::new()?;
    let flag = Arc::new(AtomicBool::new(false));
    let (set, console) = (flag.clone(), console.clone());
    tokio::spawn(async move {
        signals.next().await;
        set.store(true, Ordering::SeqCst);
        console.line(first);
        let Some(leftovers) = quit else { return };
        signals.next().await;
        leftovers.remove();
        console.bar.finish_and_clear();
        let removed = if leftovers.dir.is_some() { " (temporary folder removed)" } else { "" };
        eprintln!("loadtest: interrupted again: quit without a report{removed}");
        std::process::exit(130);
    });
    Ok(flag)
}

/// For runs of separate processes: the first SIGINT/SIGTERM sets `stop_writing` (printing
/// `first`), the second sets `abort`, which ends the run without a report (the nodes are
/// stopped as their handles drop, which `process::exit` would skip).
pub fn watch_signals_twice(
    console: &Console,
    first: &'static str,
) -> std::io::Result<(Arc<AtomicBool>, Arc<AtomicBool>)> {
    let mut signals = Signals::new()?;
    let (stop_writing, abort) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let (s, a, console) = (stop_writing.clone(), abort.clone(), console.clone());
    tokio::spawn(async move {
        signals.next().await;
        s.store(true, Ordering::SeqCst);
        console.line(first);
        signals.next().await;
        a.store(true, Ordering::SeqCst);
    });
    Ok((stop_writing, abort))
}
