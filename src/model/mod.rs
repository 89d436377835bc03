//! The model: what a service describes and asks about, and what it is told.
//!
//! Names, windows, requests, decisions, scopes, leases and the catalog of
//! meters, plans and pools. Pure values and validation: nothing here reads a
//! clock or touches a store, and nothing imports the storage seam — the seam
//! imports these.

pub(crate) mod catalog;
pub(crate) mod decision;
mod json;
pub(crate) mod lease;
pub(crate) mod name;
pub(crate) mod request;
pub(crate) mod scope;
pub(crate) mod window;
