//! The engine behind the gate, its store and clock types erased so the
//! layer is one type whatever the engine's: sync calls for an
//! [`AllowanceStore`], boxed futures for an `AsyncAllowanceStore`.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::{
    AllowanceStore, Catalog, Clock, Decision, Engine, Error, Outcome, Request, Reservation,
};

/// A reserve's answer: the reservation, or the refusing decision.
pub(super) type Reserved = Result<Result<Reservation, Decision>, Error>;

/// What the gate asks of an engine on a sync store.
pub(super) trait SyncGate: Send + Sync {
    fn check(&self, request: &Request<'_>) -> Result<Decision, Error>;
    fn record(&self, request: &Request<'_>) -> Result<Decision, Error>;
    fn reserve(&self, request: &Request<'_>, ttl: Duration) -> Reserved;
    fn commit(&self, reservation: &Reservation, actual: &Request<'_>) -> Result<Decision, Error>;
    fn release(&self, reservation: &Reservation, outcome: Outcome) -> Result<Decision, Error>;
    fn catalog(&self) -> &Catalog;
    fn now(&self) -> DateTime<Utc>;
}

impl<S: AllowanceStore, C: Clock> SyncGate for Engine<S, C> {
    fn check(&self, request: &Request<'_>) -> Result<Decision, Error> {
        Engine::check(self, request)
    }
    fn record(&self, request: &Request<'_>) -> Result<Decision, Error> {
        Engine::record(self, request)
    }
    fn reserve(&self, request: &Request<'_>, ttl: Duration) -> Reserved {
        Engine::reserve(self, request, ttl)
    }
    fn commit(&self, reservation: &Reservation, actual: &Request<'_>) -> Result<Decision, Error> {
        Engine::commit(self, reservation, actual)
    }
    fn release(&self, reservation: &Reservation, outcome: Outcome) -> Result<Decision, Error> {
        Engine::release(self, reservation, outcome)
    }
    fn catalog(&self) -> &Catalog {
        Engine::catalog(self)
    }
    fn now(&self) -> DateTime<Utc> {
        Engine::clock(self).now()
    }
}

#[cfg(feature = "async")]
pub(super) use asynchronous::{AsyncGate, BoxFuture};

#[cfg(feature = "async")]
mod asynchronous {
    use std::future::Future;
    use std::pin::Pin;
    use std::time::Duration;

    use chrono::{DateTime, Utc};

    use super::Reserved;
    use crate::store::AsyncAllowanceStore;
    use crate::{Catalog, Clock, Decision, Engine, Error, Outcome, Request, Reservation};

    /// A boxed, sendable future.
    pub(in crate::tower) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

    /// What the gate asks of an engine on an async store: each call a boxed
    /// future (one allocation beside a store round trip).
    pub(in crate::tower) trait AsyncGate: Send + Sync {
        fn check<'a>(&'a self, r: &'a Request<'a>) -> BoxFuture<'a, Result<Decision, Error>>;
        fn record<'a>(&'a self, r: &'a Request<'a>) -> BoxFuture<'a, Result<Decision, Error>>;
        fn reserve<'a>(&'a self, r: &'a Request<'a>, ttl: Duration) -> BoxFuture<'a, Reserved>;
        fn commit<'a>(
            &'a self,
            reservation: &'a Reservation,
            actual: &'a Request<'a>,
        ) -> BoxFuture<'a, Result<Decision, Error>>;
        fn release<'a>(
            &'a self,
            reservation: &'a Reservation,
            outcome: Outcome,
        ) -> BoxFuture<'a, Result<Decision, Error>>;
        fn catalog(&self) -> &Catalog;
        fn now(&self) -> DateTime<Utc>;
    }

    impl<S, C> AsyncGate for Engine<S, C>
    where
        S: AsyncAllowanceStore,
        C: Clock + Send + Sync,
    {
        fn check<'a>(&'a self, r: &'a Request<'a>) -> BoxFuture<'a, Result<Decision, Error>> {
            Box::pin(self.check_async(r))
        }
        fn record<'a>(&'a self, r: &'a Request<'a>) -> BoxFuture<'a, Result<Decision, Error>> {
            Box::pin(self.record_async(r))
        }
        fn reserve<'a>(&'a self, r: &'a Request<'a>, ttl: Duration) -> BoxFuture<'a, Reserved> {
            Box::pin(self.reserve_async(r, ttl))
        }
        fn commit<'a>(
            &'a self,
            reservation: &'a Reservation,
            actual: &'a Request<'a>,
        ) -> BoxFuture<'a, Result<Decision, Error>> {
            Box::pin(self.commit_async(reservation, actual))
        }
        fn release<'a>(
            &'a self,
            reservation: &'a Reservation,
            outcome: Outcome,
        ) -> BoxFuture<'a, Result<Decision, Error>> {
            Box::pin(self.release_async(reservation, outcome))
        }
        fn catalog(&self) -> &Catalog {
            Engine::catalog(self)
        }
        fn now(&self) -> DateTime<Utc> {
            Engine::clock(self).now()
        }
    }
}
