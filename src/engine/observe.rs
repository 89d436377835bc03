//! What the engine tells an [`Observer`]: the call, and every decision.

use chrono::{DateTime, Utc};

use super::Engine;
use crate::clock::Clock;
use crate::decision::Decision;
use crate::request::Request;

/// Which engine call made a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Call {
    /// [`Engine::check`].
    Check,
    /// [`Engine::admit`].
    Admit,
    /// [`Engine::record`].
    Record,
    /// [`Engine::reserve`].
    Reserve,
    /// [`Engine::grow`].
    Grow,
    /// [`Engine::commit`].
    Commit,
    /// [`Engine::release`].
    Release,
    /// [`Engine::renew`] (a span and store metrics; it makes no decision).
    Renew,
    /// [`Engine::usage`] (a span and store metrics; it makes no decision).
    Usage,
}

/// A decision as an [`Observer`] sees it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct DecisionEvent<'a> {
    /// The call that made it.
    pub call: Call,
    /// The subject asked about.
    pub subject: &'a str,
    /// The model named, if any.
    pub model: Option<&'a str>,
    /// The engine's clock at the decision.
    pub at: DateTime<Utc>,
    /// The decision.
    pub decision: &'a Decision,
}

/// Sees every decision the engine makes: log rejections with their reason,
/// count unpriced usage, export metrics. Called after the store has applied
/// the batch, outside every lock; keep it quick.
pub trait Observer: Send + Sync {
    /// Called once per decision.
    fn on_decision(&self, event: &DecisionEvent<'_>);

    /// Called once per change to an allocation made through this engine
    /// (and for an allocation from a shared source that it refuses): see
    /// [`AuditEvent`](super::AuditEvent). Does nothing unless implemented.
    fn on_audit(&self, event: &super::AuditEvent) {
        let _ = event;
    }
}

impl<F: Fn(&DecisionEvent<'_>) + Send + Sync> Observer for F {
    fn on_decision(&self, event: &DecisionEvent<'_>) {
        self(event);
    }
}

impl<S, C: Clock> Engine<S, C> {
    /// Show `decision` to the observer, if there is one.
    pub(super) fn observe(
        &self,
        call: Call,
        req: &Request<'_>,
        at: DateTime<Utc>,
        decision: &Decision,
    ) {
        if let Some(o) = &self.observer {
            o.on_decision(&DecisionEvent {
                call,
                subject: req.subject,
                model: req.model,
                at,
                decision,
            });
        }
    }
}
