//! Shared helpers for the integration tests (mounting ringfs, probing capabilities).
