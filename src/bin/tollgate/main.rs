//! `tollgate`: check a catalog, replay a usage log against plans, read a
//! memory snapshot. Built with feature `cli`.

#![forbid(unsafe_code)]

mod catalog;
mod chart;
mod fast;
mod log;
mod replay;
mod report;
mod usage;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Quota plans, checked and tried on real traffic before they ship.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a JSON or TOML catalog; print every error with its field
    /// path. Exit code 1 on any error.
    Check {
        /// The catalog file (`.json` or `.toml`).
        plans: PathBuf,
    },
    /// Replay a usage log (JSON Lines, or CSV when it ends in `.csv`)
    /// through a memory engine on a manual clock, and report per plan and
    /// per subject: requests, admitted, refused by reason and meter, cost,
    /// and the peak use of each limit.
    Replay {
        /// The catalog file.
        #[arg(long)]
        plans: PathBuf,
        /// The usage log.
        #[arg(long)]
        log: PathBuf,
        /// Put SUBJECT (or every other subject, `*`) on PLAN. Repeatable.
        /// Without `*`, subjects not named go on the catalog's first plan.
        #[arg(long = "plan", value_name = "SUBJECT_OR_*=PLAN", value_parser = assignment)]
        assign: Vec<(String, String)>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Stop at the first bad line (exit code 1).
        #[arg(long)]
        strict: bool,
        /// Write an SVG chart of each limit's use over time against its maximum.
        #[arg(long, value_name = "FILE.svg")]
        chart: Option<PathBuf>,
        /// What each prepaid balance starts with, in its plan's currency
        /// (e.g. `100.00`). Without it, balances start with a credit no log
        /// spends, so only limits refuse.
        #[arg(long, value_name = "AMOUNT")]
        balance: Option<rust_decimal::Decimal>,
    },
    /// Print a memory snapshot's usage: each scope's counters, used and held.
    Usage {
        /// The snapshot, as JSON (`serde_json::to_string(&store.snapshot())`).
        #[arg(long)]
        snapshot: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn assignment(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((subject, plan)) if !subject.is_empty() && !plan.is_empty() => {
            Ok((subject.to_owned(), plan.to_owned()))
        }
        _ => Err(format!("`{s}` is not SUBJECT=PLAN or *=PLAN")),
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check { plans } => match catalog::parse(&plans) {
            Err(p) => {
                catalog::report(&plans, &[p]);
                ExitCode::FAILURE
            }
            Ok(config) => {
                let problems = catalog::problems(&config);
                if problems.is_empty() {
                    println!(
                        "{}: ok ({} meters, {} plans, {} pools)",
                        plans.display(),
                        config.meters.len(),
                        config.plans.len(),
                        config.pools.len()
                    );
                    ExitCode::SUCCESS
                } else {
                    catalog::report(&plans, &problems);
                    ExitCode::FAILURE
                }
            }
        },
        Command::Replay {
            plans,
            log,
            assign,
            json,
            strict,
            chart,
            balance,
        } => {
            let opts = replay::Options {
                log,
                plans: assign,
                strict,
                chart: chart.is_some(),
                progress: true,
                balance,
            };
            replay_command(&plans, &opts, json, chart)
        }
        Command::Usage { snapshot, json } => match usage::run(&snapshot, json) {
            Ok(text) => {
                print!("{}", shown(&text));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}", shown(&e.to_string()));
                ExitCode::FAILURE
            }
        },
    }
}

fn replay_command(
    plans: &std::path::Path,
    opts: &replay::Options,
    json: bool,
    chart: Option<PathBuf>,
) -> ExitCode {
    let catalog = match catalog::load(plans) {
        Ok(c) => c,
        Err(problems) => {
            catalog::report(plans, &problems);
            return ExitCode::FAILURE;
        }
    };
    for (subject, plan) in &opts.plans {
        if catalog.plan(plan).is_none() {
            eprintln!(
                "--plan {subject}={plan}: no plan `{plan}` in {}",
                plans.display()
            );
            return ExitCode::FAILURE;
        }
    }
    let out = match replay::run(&catalog, opts) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("{}", shown(&e));
            return ExitCode::FAILURE;
        }
    };
    for b in &out.bad {
        eprintln!(
            "{}: line {}: {}",
            opts.log.display(),
            b.line,
            shown(&b.reason)
        );
    }
    if json {
        println!("{:#}", report::json(&out));
    } else {
        print!("{}", shown(&report::text(&out)));
    }
    if let Some(path) = chart {
        // With no event replayed the chart has no time axis: its panels stay empty.
        let (from, to) = out.span.unwrap_or((0, 1));
        if let Err(e) = std::fs::write(&path, chart::svg(&out.series, from, to)) {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if out.stopped {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Text for a terminal: each line with its control characters written as
/// `\u{..}` (a log's subject id or a snapshot's meter cannot move the
/// cursor or recolour the screen), line breaks kept.
fn shown(text: &str) -> String {
    text.split('\n')
        .map(catalog::visible)
        .collect::<Vec<_>>()
        .join("\n")
}
