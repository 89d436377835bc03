//! What a caller asks about: a subject, amounts per meter, optionally a model.

use rust_decimal::Decimal;

use crate::inline::Inline;

/// Amounts a request keeps inline; more spill to the heap.
const INLINE_AMOUNTS: usize = 4;

/// An amount of one meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity<'a> {
    /// Whole units of a count or seconds meter; unsigned, so never negative.
    Units(u64),
    /// Money for a money meter, in its major unit (dollars, not cents).
    /// Fractions below the meter's scale are rounded up.
    Money {
        /// The amount; negative amounts are refused.
        amount: Decimal,
        /// Its currency; it must match the meter's.
        currency: &'a str,
    },
}

/// A request: may `subject` spend these amounts now?
///
/// ```
/// use tollgate::Request;
/// let req = Request::new("agent-7")
///     .units("llm_tokens_input", 1_200)
///     .units("jobs", 1)
///     .model("claude-sonnet");
/// assert_eq!(req.subject(), "agent-7");
/// ```
///
/// # Amounts are never negative
///
/// Counts and seconds are `u64` ([`Request::units`]), so a negative count
/// cannot be written: usage only ever adds, and there is no "give back 5
/// tokens" request by design. Usage returns through its window (a period
/// ends, a rolling bucket leaves) or through a reservation: hold an estimate
/// with [`Engine::reserve`](crate::Engine::reserve) and settle the actual
/// amount with `commit`, or `release` it under the plan's refund policy.
/// Money is a signed [`Decimal`] ([`Request::money`]) only because that is
/// the exact decimal type; a negative money amount is refused with
/// [`Error::NegativeAmount`](crate::Error::NegativeAmount) and changes
/// nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub(crate) subject: &'a str,
    pub(crate) model: Option<&'a str>,
    pub(crate) amounts: Inline<(&'a str, Quantity<'a>), INLINE_AMOUNTS>,
    pub(crate) pools: Vec<&'a str>,
    pub(crate) event: Option<&'a str>,
    /// The async engine made `event` for this very call
    /// ([`EventKey::engine_made`](crate::store::EventKey::engine_made)).
    pub(crate) event_made: bool,
}

impl<'a> Request<'a> {
    /// A request for `subject` with no amounts yet.
    #[inline]
    pub fn new(subject: &'a str) -> Self {
        Self {
            subject,
            model: None,
            amounts: Inline::filled(("", Quantity::Units(0))),
            pools: Vec::new(),
            event: None,
            event_made: false,
        }
    }

    /// Add `n` units of `meter`. Naming a meter twice adds the amounts.
    /// `n` is unsigned: a request never takes usage away (see
    /// [Amounts are never negative](Request#amounts-are-never-negative)).
    #[must_use]
    #[inline]
    pub fn units(mut self, meter: &'a str, n: u64) -> Self {
        self.amounts.push((meter, Quantity::Units(n)));
        self
    }

    /// Add money to a money `meter` (for example a cost the host priced
    /// itself). A negative `amount` is refused by the engine with
    /// [`Error::NegativeAmount`](crate::Error::NegativeAmount).
    #[must_use]
    #[inline]
    pub fn money(mut self, meter: &'a str, amount: Decimal, currency: &'a str) -> Self {
        self.amounts
            .push((meter, Quantity::Money { amount, currency }));
        self
    }

    /// Add `n` units of `meter` in place: [`Request::units`] for a request
    /// built in a loop, without moving it at each step.
    ///
    /// ```
    /// use tollgate::Request;
    /// let mut req = Request::new("agent-7");
    /// for (meter, n) in [("llm_tokens_input", 1_200), ("jobs", 1)] {
    ///     req.add_units(meter, n);
    /// }
    /// assert_eq!(req, Request::new("agent-7").units("llm_tokens_input", 1_200).units("jobs", 1));
    /// ```
    #[inline]
    pub fn add_units(&mut self, meter: &'a str, n: u64) -> &mut Self {
        self.amounts.push((meter, Quantity::Units(n)));
        self
    }

    /// Add money to a money `meter` in place: [`Request::money`] for a
    /// request built in a loop.
    #[inline]
    pub fn add_money(&mut self, meter: &'a str, amount: Decimal, currency: &'a str) -> &mut Self {
        self.amounts
            .push((meter, Quantity::Money { amount, currency }));
        self
    }

    /// Name the model the work runs on: the allocation's allowlist is checked
    /// and the model's global pools are drawn on.
    #[must_use]
    #[inline]
    pub fn model(mut self, model: &'a str) -> Self {
        self.model = Some(model);
        self
    }

    /// Draw on a pool of the catalog for this request only (a repository the
    /// job works on): its limits and its cooldown apply as if the allocation
    /// listed it. Naming a pool twice, or one the allocation already lists,
    /// draws on it once.
    #[must_use]
    #[inline]
    pub fn pool(mut self, pool: &'a str) -> Self {
        self.pools.push(pool);
        self
    }

    /// An idempotency key: `admit`, `record` and `commit` apply a request with
    /// an event id once within the store's horizon, and answer a retry with
    /// the first [`Decision`](crate::Decision). Reusing the id for different
    /// amounts is [`Error::EventConflict`](crate::Error::EventConflict).
    /// `check` ignores it; `reserve` and `grow` refuse it.
    ///
    /// To retry a call whose error named an id the async engine made
    /// ([`Error::StoreOutcomeUnknown`](crate::Error::StoreOutcomeUnknown)'s
    /// `event`), pass that id here: it is then the host's id like any
    /// other, and the store's ledger applies the call at most once.
    #[must_use]
    #[inline]
    pub fn event(mut self, id: &'a str) -> Self {
        self.event = Some(id);
        self.event_made = false;
        self
    }

    /// `self` with an event id the async engine made for this very call.
    #[cfg(feature = "async")]
    pub(crate) fn made_event(mut self, id: &'a str) -> Self {
        self.event = Some(id);
        self.event_made = true;
        self
    }

    /// The event id and whether the engine made it for this call.
    #[inline]
    pub(crate) fn event_ref(&self) -> Option<(&'a str, bool)> {
        self.event.map(|id| (id, self.event_made))
    }

    /// The pools named for this request only.
    pub fn pools(&self) -> &[&'a str] {
        &self.pools
    }

    /// The event id, if any.
    pub fn event_id(&self) -> Option<&str> {
        self.event
    }

    /// The subject.
    pub fn subject(&self) -> &str {
        self.subject
    }

    /// The model, if named.
    pub fn model_name(&self) -> Option<&str> {
        self.model
    }

    /// The amounts, in the order given.
    pub fn amounts(&self) -> &[(&'a str, Quantity<'a>)] {
        &self.amounts
    }
}
