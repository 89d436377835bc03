//! The engine's async calls on `MemoryStore` (feature `async`).
