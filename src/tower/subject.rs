//! How the middleware finds a request's subject.

use std::fmt;
use std::sync::Arc;

use ::http::header::HeaderName;
use ::http::request;

/// How the middleware finds the subject of a request.
///
/// Cheap to clone.
#[derive(Clone)]
pub struct SubjectSource {
    find: Arc<FindSubject>,
}

type FindSubject = dyn Fn(&request::Parts) -> Result<String, SubjectError> + Send + Sync;

impl fmt::Debug for SubjectSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubjectSource").finish_non_exhaustive()
    }
}

/// Why no subject could be read from a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubjectError {
    /// The request names no subject: answered with the
    /// [unknown-subject status](super::QuotaLayer::unknown_subject).
    Missing,
    /// The request names a subject badly: answered with 400 Bad Request.
    Malformed,
}

impl SubjectSource {
    /// The value of the header `name` (for example `x-api-key`). Missing:
    /// [`SubjectError::Missing`]. Empty, holding any byte that is not
    /// visible ASCII (`!` to `~`: no space, no tab, no control or non-ASCII
    /// byte), or present more than once: [`SubjectError::Malformed`].
    ///
    /// # Panics
    /// If `name` is not a valid lower-case header name; pass a
    /// [`HeaderName`] through [`SubjectSource::header_name`] to avoid that.
    pub fn header(name: &'static str) -> Self {
        Self::header_name(HeaderName::from_static(name))
    }

    /// Like [`SubjectSource::header`], for a [`HeaderName`] built at run time.
    pub fn header_name(name: HeaderName) -> Self {
        Self::from_fn(move |parts| {
            let mut values = parts.headers.get_all(&name).iter();
            let value = values.next().ok_or(SubjectError::Missing)?;
            if values.next().is_some() {
                return Err(SubjectError::Malformed);
            }
            let bytes = value.as_bytes();
            if bytes.is_empty() || !bytes.iter().all(|b| (b'!'..=b'~').contains(b)) {
                return Err(SubjectError::Malformed);
            }
            // Visible ASCII is UTF-8.
            value
                .to_str()
                .map(str::to_owned)
                .map_err(|_| SubjectError::Malformed)
        })
    }

    /// The subject an earlier layer (authentication) put in the request's
    /// extensions as a `T`; `id` says which string of it is the subject. No
    /// `T`: [`SubjectError::Missing`]; an empty id:
    /// [`SubjectError::Malformed`].
    ///
    /// ```
    /// #[derive(Clone)]
    /// struct Account(String);
    /// let source = tollgate::tower::SubjectSource::extension(|a: &Account| a.0.as_str());
    /// # let _ = source;
    /// ```
    pub fn extension<T, F>(id: F) -> Self
    where
        T: Send + Sync + 'static,
        F: Fn(&T) -> &str + Send + Sync + 'static,
    {
        Self::from_fn(move |parts| {
            let ext = parts.extensions.get::<T>().ok_or(SubjectError::Missing)?;
            match id(ext) {
                "" => Err(SubjectError::Malformed),
                s => Ok(s.to_owned()),
            }
        })
    }

    /// Any rule the host likes, such as a bearer token looked up in a map.
    pub fn from_fn<F>(find: F) -> Self
    where
        F: Fn(&request::Parts) -> Result<String, SubjectError> + Send + Sync + 'static,
    {
        Self {
            find: Arc::new(find),
        }
    }

    /// Read the subject from a request's parts.
    ///
    /// # Errors
    /// [`SubjectError`] when the request names no subject, or names one badly.
    pub fn find(&self, parts: &request::Parts) -> Result<String, SubjectError> {
        (self.find)(parts)
    }
}
